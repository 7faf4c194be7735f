"""User plugins: a Python file that registers its own strategies or modes, without editing the package.

    # my_modes.py
    from Generation.TrainGen.core.modes import MODES, TrainingMode
    class T2Mode(TrainingMode): ...
    MODES["t2"] = T2Mode

    python Generation/TrainGen/train.py --plugin my_modes.py --mode t2 ...

The file is run once, before the flags are read (so --mode/--strategy accept its names). It is code the user
chose to run, given on the command line: a checkpoint never names a plugin to import.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from common.errors import UserError

_loaded: dict[str, object] = {}


def plugin_paths(argv: list[str]) -> list[str]:
    """The values of every --plugin FILE / --plugin=FILE in argv (read before the full parser exists)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            out.append(arg.split("=", 1)[1])
    return out


def load_plugins(paths: list[str]) -> None:
    for raw in paths:
        path = Path(raw).resolve()
        if str(path) in _loaded:
            continue
        if not path.is_file() or path.suffix != ".py":
            raise UserError(f"--plugin {raw}: not a Python file")
        spec = importlib.util.spec_from_file_location(f"medgen_plugin_{len(_loaded)}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's file failed: one line naming it
            raise UserError(f"--plugin {raw}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") \
                from None
        _loaded[str(path)] = module
