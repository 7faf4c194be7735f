"""Atomic file writes (a crash or preemption never leaves a half-written file under the final name), and safe
loading of files that may come from anywhere (torch.load with weights_only)."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from medgen.common.errors import UserError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file in the same folder, fsync it, then os.replace onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def exclusive_write_text(path: str | Path, text: str) -> Path:
    """Write text to path only if no file is there: written in full to a temp file, then hard-linked onto the
    name (os.link fails if it exists, atomically); FileExistsError when another process was first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path


def remove_stale_tmp(folder: str | Path, older_than_s: float = 0.0) -> int:
    """Delete the temp files (.NAME.*.tmp) that a killed atomic_write left in folder and its sub-folders, when
    not modified for older_than_s seconds (0: all of them, for folders no other process writes into)."""
    now, removed = time.time(), 0
    for tmp in Path(folder).rglob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # finished or removed by its writer meanwhile
            pass
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def safe_load(path: Path, what: str) -> dict:
    """torch.load(weights_only=True): a file is untrusted input; any failure is one UserError line."""
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        text = str(err)
        if "weights_only" in text or "Weights only load failed" in text:
            # torch's own message suggests weights_only=False, i.e. running code from the file: never do that
            reason = "it holds objects other than tensors and plain containers, which are not loaded from files"
        else:
            reason = f"{type(err).__name__}: {text.splitlines()[0][:200] if text else 'corrupt'}"
        raise UserError(f"{path}: not a loadable {what} ({reason})") from None
