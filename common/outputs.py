"""The one owner of every folder medgen writes (generate.py and Samples.save, segment outputs, medgen demo,
medgen export, evaluation and utility reports, training run folders).

A folder may be written when it is new, empty, or marked as made by the same kind of job: the mark is a small
file, MARK, that `claim` writes before anything else. A folder that holds anything medgen did not make is refused
naming one entry, so a user's own file is never deleted or overwritten. Folders made before the mark existed are
recognised by the file their job always wrote first (`own`, e.g. generation.json). Outputs and inputs are kept
apart: an output inside an input (a dataset, a run folder) or an input inside the output is refused, since a
generated folder inside a dataset becomes part of it (and generation.json marks its scans as normalised).
Medgen never makes symbolic links, so one inside an output folder was planted: it is refused, which keeps every
internal path (.rows, .lock-*, temp files) inside the folder the user named.

Every check runs before the first write, so a refused command leaves the folder as it was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from medgen.common.errors import UserError, os_error_text

MARK = ".medgen.json"
IGNORED = {".DS_Store", "Thumbs.db", "desktop.ini"}   # made by file browsers, not by the user: never counted


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.realpath(path)))


def check_apart(out: Path, flag: str, inputs: dict | None = None, nest_ok: tuple[str, ...] = ()) -> None:
    """Refuse an output that is, or lies inside, an input, and an input inside the output. A checkpoint file's
    run folder counts as the input. `nest_ok`: the flags whose (medgen-made) folder may hold the
    output in a sub-folder (an evaluation written into the synthetic set it evaluates)."""
    target = _resolved(out)
    for name, value in (inputs or {}).items():
        for given in (value if isinstance(value, (list, tuple)) else [value]):
            if given in (None, ""):
                continue
            folder = _resolved(given)
            if folder.is_file() and (folder.parent / "config.yaml").is_file():
                folder = folder.parent              # a checkpoint of a run folder: the run is the input
            if target == folder or (target.is_relative_to(folder) and name not in nest_ok):
                raise UserError(f"{flag} {out} lies inside {name} {given}: output is never written into an input "
                                "(it would become part of it); give a folder outside it")
            if folder.is_relative_to(target):
                raise UserError(f"{flag} {out} holds {name} {given}: output is never written around an input; "
                                "give a folder beside it")


def made_by(folder: Path) -> str | None:
    """The kind of job whose mark the folder carries, else None."""
    try:
        record = json.loads((Path(folder) / MARK).read_text())
    except (OSError, ValueError):
        return None
    return record.get("kind") if isinstance(record, dict) and isinstance(record.get("kind"), str) else None


def _planted_link(folder: Path) -> Path | None:
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                return Path(root) / name
    return None


def check_path(out: Path, flag: str) -> None:
    """`out` can be a folder: not a file, a broken link, or a path under a file."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise UserError(f"{flag} {out}: a broken symbolic link")
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {out}: {parent} is a file, not a folder")
        if parent.exists():
            break


def check_owned(out: Path, kind: str, flag: str, own: tuple[str, ...] = ()) -> None:
    """Refuse to write into `out` unless it is missing, empty, or made by a `kind` job (read-only: no write)."""
    out = Path(out)
    check_path(out, flag)
    if not out.is_dir():
        return
    try:
        entries = sorted(p for p in out.iterdir() if p.name not in IGNORED)
    except OSError as err:
        raise UserError(f"{flag} {out}: cannot be read ({os_error_text(err)})") from None
    if not entries:
        return
    made = made_by(out)
    if made is None and (out / MARK).exists():
        raise UserError(f"{flag} {out}: its {MARK} is damaged, so medgen cannot tell that it made this folder; "
                        "give another folder")
    if made is None and not any(p.is_file() for pattern in own for p in out.glob(pattern)):
        foreign = next((p for p in entries if not p.name.startswith(".")), entries[0])
        raise UserError(f"{flag} {out}: holds {foreign.name}, which medgen did not make; medgen writes only into a "
                        "new or empty folder, or one it made for the same job, and never over a file of yours: "
                        "give another folder")
    if made is not None and made != kind:
        raise UserError(f"{flag} {out}: made by a medgen {made} job, not a {kind} job; give another folder")
    link = _planted_link(out)
    if link is not None:
        raise UserError(f"{flag} {out}: holds the symbolic link {link.relative_to(out)}, which medgen never makes "
                        "(it could send files outside this folder); remove it or give another folder")


def claim(out, kind: str, flag: str = "--output_dir", inputs: dict | None = None, own: tuple[str, ...] = (),
          nest_ok: tuple[str, ...] = ()) -> Path:
    """Make `out` the output folder of a `kind` job: every check (apart from the inputs, owned by medgen or new,
    no planted link), then the folder and its mark. Returns the folder."""
    out = Path(out)
    check_apart(out, flag, inputs, nest_ok)
    check_owned(out, kind, flag, own)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if made_by(out) is None:
            from medgen.common.fileio import atomic_write_text
            atomic_write_text(out / MARK, json.dumps({"kind": kind}))
    except OSError as err:
        raise UserError(f"{flag} {out}: cannot be written ({os_error_text(err)})") from None
    return out
