"""Names that become paths. A class name from a CSV, a folder or a shared checkpoint, a --class_counts entry or
a file a plugin mode names is checked once where it enters (check_name), and every generated file is placed
through inside(), which resolves the target (symlinked folders included) and refuses anything outside the
output folder the user named."""
from __future__ import annotations

import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath

from medgen.common.errors import UserError


def name_problem(name) -> str | None:
    """Why `name` cannot be one path component (a class or file name), or None when it can."""
    if not isinstance(name, str):
        return f"not text ({type(name).__name__})"
    if not name.strip():
        return "empty"
    if name in (".", ".."):
        return f"{name!r} names a folder, not a class"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "holds a control character"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path"
    if name != name.strip():
        return "starts or ends with white space"
    return None


def check_name(name, source: str) -> str:
    """name, if it can be a single path component; else one UserError naming where it came from."""
    problem = name_problem(name)
    if problem:
        raise UserError(f"{source}: the name {name!r} {problem}; class and file names become folder and file "
                        "names, so they must be one plain path component")
    return name


def inside(root: Path, rel: str | Path, what: str = "--output_dir") -> Path:
    """root / rel, refused unless it resolves (symbolic links followed) inside root."""
    root = Path(root)
    base = root.resolve()
    target = (base / rel).resolve()
    if target != base and not target.is_relative_to(base):
        raise UserError(f"{what} {root}: refusing to write {rel} outside it (it resolves to {target})")
    return root / rel


def patient_regex(pattern: str, what: str = "data.patient_pattern") -> "re.Pattern":
    """The compiled patient pattern, or one line naming `what` when it is not a usable regex."""
    import re
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise UserError(f"{what} {pattern!r} is not a regular expression: {err}") from None
    if not pattern:
        raise UserError(f"{what} is empty: give a regex whose first group is the patient, e.g. '^(P\\d+)_'")
    return rx


def patient_of(path, pattern: str | None, what: str = "data.patient_pattern") -> str | None:
    """The patient of an image file: the first group of the pattern's match in its file name (the whole match
    when the pattern has no group); None without a pattern. A name that does not match is one line naming it."""
    if pattern is None:
        return None
    m = patient_regex(pattern, what).search(Path(path).name)
    patient = None if m is None else m.group(1) if m.re.groups else m.group(0)
    if not patient:
        raise UserError(f"{path}: its name does not match {what} {pattern!r}, so its patient is unknown")
    return patient
