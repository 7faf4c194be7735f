"""Atomic file writes: a crash or preemption never leaves a half-written file under the final name."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable


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
