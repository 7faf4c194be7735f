"""User-facing failures: one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (flags, config, data). Printed as one line, exit code 2."""


def require(ok: bool, message: str) -> None:
    """A config or flag check: UserError(message) unless ok."""
    if not ok:
        raise UserError(message)


def lookup(registry: dict, name: str, flag: str):
    """registry[name], or a UserError naming the flag and the registered choices."""
    if name not in registry:
        raise UserError(f"{flag} {name!r} is unknown (choose from {', '.join(registry)})")
    return registry[name]


def os_error_text(err: OSError) -> str:
    """One line for an OSError (a read-only folder, a file where a folder is needed, a full disk...)."""
    reason = err.strerror or type(err).__name__
    return f"{err.filename}: {reason}" if err.filename is not None else (reason if err.strerror else str(err))


def run_main(main: Callable[[], int | None]) -> None:
    """Run an entry point; turn UserError into `error: ...` on stderr and exit 2. An OSError that reaches here
    (a folder the user named is read-only, a file stands where a folder must be, the disk is full) is the
    user's environment, not a bug: one line naming the path, exit 2."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"error: {os_error_text(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def shape_text(shape, unit: str = " px") -> str:
    """(128, 128) -> '128 px'; (48, 64, 64) -> '64x64x48' (volumes as H x W x D, as data.volume_shape is given)."""
    if len(shape) == 2 and shape[0] == shape[1]:
        return f"{shape[0]}{unit}"
    return grid_text(shape)


def grid_text(shape) -> str:
    """A spatial shape as the user gives it: (32, 48) -> '32x48'; (D, H, W) volumes -> 'HxWxD' (data.volume_shape)."""
    shape = tuple(shape)
    return "x".join(map(str, (*shape[1:], shape[0]) if len(shape) == 3 else shape))
