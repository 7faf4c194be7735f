"""Checkpoints: atomic writes, prune only after the new file is complete, safe loading (weights_only)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from medgen.common.errors import UserError
from medgen.common.fileio import atomic_write, safe_load

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")
PREEMPT_FILE = ".preempt"   # touched by the SLURM script's SIGUSR1 trap (or by hand): checkpoint and stop
REQUEUE_FILE = ".requeue"   # left by a preempted run: the job script requeues itself


def leave_requeue_mark(run_dir: Path) -> None:
    """After the checkpoint a preemption request asked for: the request is answered, the job script requeues."""
    (run_dir / PREEMPT_FILE).unlink(missing_ok=True)
    (run_dir / REQUEUE_FILE).touch()


def save_checkpoint(state: dict, run_dir: Path, step: int, keep_last: int, is_best: bool = False) -> Path:
    path = atomic_write(Path(run_dir) / f"ckpt_{step:08d}.pt", lambda tmp: torch.save(state, tmp))
    if is_best:
        atomic_write(Path(run_dir) / "best.pt", lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if CKPT_RE.match(p.name))


def checkpoint_file(path: Path, prefer_best: bool = False) -> Path:
    """A checkpoint file as given, or in a run folder its latest ckpt_*.pt (its best.pt first when
    prefer_best and one was kept)."""
    path = Path(path)
    if path.is_dir():
        if prefer_best and (path / "best.pt").is_file():
            return path / "best.pt"
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"{path}: no checkpoint ({'best.pt or ' if prefer_best else ''}ckpt_*.pt) in this run folder")
        return found[-1]
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: Path, say=print) -> dict:
    """The latest checkpoint of a run folder (for resuming), or the given file. In a run folder an unreadable
    newest file (a full disk, a damaged copy) is passed over for the newest intact one, and said so."""
    path = Path(path)
    if not path.is_dir():
        return safe_load(checkpoint_file(path), "checkpoint")
    found = list_checkpoints(path)
    for i, file in enumerate(reversed(found)):
        try:
            state = safe_load(file, "checkpoint")
        except UserError as err:
            if i == len(found) - 1:
                raise UserError(f"{path}: no intact checkpoint (the oldest: {err})") from None
            say(f"warning: {err}; trying the one before it")
            continue
        if i:
            say(f"resuming from {file.name}, the newest intact checkpoint")
        return state
    return safe_load(checkpoint_file(path), "checkpoint")  # no ckpt_*.pt: the usual error


def best_checkpoint(path: Path) -> Path:
    """A checkpoint file, or a run folder's best.pt (the latest ckpt_*.pt when no best was kept)."""
    return checkpoint_file(path, prefer_best=True)


def model_weights(state: dict) -> dict:
    """The weights to sample with: the EMA model's when the checkpoint has one, else the online model's."""
    prefix = "ema_model."
    if state.get("ema"):
        ema = {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}
        if ema:
            return ema
    return state["model"]
