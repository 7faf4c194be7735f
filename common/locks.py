"""One writer per folder: a run folder is trained by one job at a time, an output folder (or one shard of it) is
filled by one generate.py at a time.

The lock is a file created with O_EXCL that names its owner (host, pid, SLURM job, command). A lock whose
owner is gone is stale and taken over: on the same host when its pid no longer runs (or is this very
process), anywhere when it belongs to this same SLURM job (a requeued job starts on another node after its
predecessor was killed). A lock held by a live process, or by a process on another host that cannot be
checked, is refused with one line naming the owner and the file to delete if that owner is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from medgen.common.errors import UserError
from medgen.common.names import inside


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process: it runs
        return True
    return True


def is_stale(owner: dict) -> bool:
    if owner.get("damaged"):      # unreadable for over a minute: no writer is still filling it
        return True
    me = _owner()
    if owner.get("slurm_job") and owner["slurm_job"] == me["slurm_job"]:
        return True
    if owner.get("host") != me["host"]:
        return False
    pid = owner.get("pid")
    return not isinstance(pid, int) or pid == me["pid"] or not _alive(pid)


def _read(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        if isinstance(owner, dict):
            return owner
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    # being written this instant, or damaged (not JSON, not an object): damaged and older than a minute is stale
    try:
        old = time.time() - path.stat().st_mtime > 60
    except FileNotFoundError:
        return None
    return {"damaged": True} if old else {"host": "?", "pid": -1, "writing": True}


def describe(owner: dict) -> str:
    """'host pid N (SLURM job J) since T: command' of a lock's owner."""
    return (f"{owner.get('host')} pid {owner.get('pid')}" +
            (f" (SLURM job {owner['slurm_job']})" if owner.get("slurm_job") else "") +
            (f" since {owner['since']}: {owner.get('command', '')}" if owner.get("since") else ""))


def holder(folder: Path, name: str = ".lock") -> dict | None:
    """The live owner of folder's lock (or {'writing': True} for one being written), None when it is free."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    owner = _read(path)
    return None if owner is None or is_stale(owner) else owner


def acquire(folder: Path, what: str, name: str = ".lock") -> Path:
    """Create folder/name for this process, or raise UserError naming the live owner."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = inside(folder, name, what)
    if path.is_dir():
        raise UserError(f"{what} {folder}: its lock {path} is a folder, not a lock file medgen wrote; remove it")
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:
                continue                       # released meanwhile
            if owner.get("writing"):
                raise UserError(f"{what} {folder}: its lock {path} is being written or is damaged; if no other "
                                f"job uses this folder, delete {path} (or wait a minute: a damaged lock is then "
                                "taken over)")
            if not is_stale(owner):
                raise UserError(f"{what} {folder} is in use by {describe(owner)}; wait for it to finish or use "
                                f"another folder (if that process is gone, delete {path})")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()                  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_owner(), f)
        return path
    raise UserError(f"{what} {folder}: could not take the lock {path}")


def release(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    owner = _read(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def locked(folder: Path, what: str, name: str = ".lock"):
    path = acquire(folder, what, name)
    try:
        yield path
    finally:
        release(path)
