"""User plugins: a Python file that registers its own strategies or modes, without editing the package.

    # my_modes.py
    from medgen.Generation.TrainGen.core.modes import MODES, TrainingMode
    class T2Mode(TrainingMode): ...
    MODES["t2"] = T2Mode

    python Generation/TrainGen/train.py --plugin my_modes.py --mode t2 ...

The file is run once, before the flags are read (so --mode/--strategy accept its names). It is code the user
chose to run, given on the command line: a checkpoint never names a plugin to import. Registering a name that
exists already (a built-in or another plugin's) is an error unless the plugin lists it in OVERRIDES; anything
registered must be a Mode / Strategy class. Plugins written for the seed's module names
(`from Generation.TrainGen.core.modes import MODES`) keep working: while a plugin loads, those names are the
same modules as medgen's (not second copies with registries of their own).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

from medgen.common.errors import UserError

_loaded: dict[str, object] = {}
SEED_ROOTS = ("Generation", "common", "config", "eval")   # the seed's top-level names, now medgen.<name>


class SeedNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import Generation.X` gives the module object medgen.Generation.X (aliased in sys.modules)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in SEED_ROOTS:
            return None
        real = importlib.import_module(f"medgen.{name}")
        return importlib.util.spec_from_loader(name, self, is_package=hasattr(real, "__path__"))

    def create_module(self, spec):
        real = sys.modules[f"medgen.{spec.name}"]
        self.saved = real.__spec__       # the import system points __spec__ at the alias; put it back below
        return real

    def exec_module(self, module):
        module.__spec__ = self.saved


@contextlib.contextmanager
def seed_names():
    """The seed's module names resolve to medgen's modules (first in the finders: a checkout's own folders
    on sys.path would otherwise load as second copies)."""
    finder = SeedNames()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def plugin_paths(argv: list[str]) -> list[str]:
    """The values of every --plugin FILE / --plugin=FILE in argv (read before the full parser exists)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            out.append(arg.split("=", 1)[1])
    return out


def _registries() -> dict[str, tuple[dict, type]]:
    from medgen.Generation.TrainGen.core.modes import MODES, Mode
    from medgen.Generation.TrainGen.core.strategies import STRATEGIES
    from medgen.Generation.TrainGen.core.strategies.base import Strategy
    return {"MODES": (MODES, Mode), "STRATEGIES": (STRATEGIES, Strategy)}


def registration_problem(module, before: dict[str, dict]) -> str | None:
    """What is wrong with what a plugin registered, or None: every entry a class of the right kind, and no
    replaced entry (a built-in mode or another plugin's) unless the plugin names it in OVERRIDES = {"bravo"}."""
    allowed = set(getattr(module, "OVERRIDES", ()) or ())
    for reg_name, (registry, base) in _registries().items():
        old = before[reg_name]
        for key, value in registry.items():
            if old.get(key) is value:
                continue
            if not (isinstance(value, type) and issubclass(value, base)):
                return f"{reg_name}[{key!r}] = {value!r} is not a {base.__name__} subclass"
            if key in old and key not in allowed:
                return (f"{reg_name}[{key!r}] is already registered ({old[key].__module__}.{old[key].__name__}); "
                        f"choose another name, or set OVERRIDES = {{{key!r}}} in the plugin to replace it on purpose")
        removed = [key for key in old if key not in registry]
        if removed:
            return f"removed {reg_name}[{removed[0]!r}]"
    return None


def check_registrations(raw: str, module, before: dict[str, dict]) -> None:
    """Refuse a plugin's registrations (registration_problem), putting the registries back as they were."""
    problem = registration_problem(module, before)
    if problem:
        for reg_name, (registry, _) in _registries().items():
            registry.clear()
            registry.update(before[reg_name])
        raise UserError(f"--plugin {raw}: {problem}")


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
        before = {name: dict(reg) for name, (reg, _) in _registries().items()}
        try:
            with seed_names():
                spec.loader.exec_module(module)
        except KeyboardInterrupt:
            raise
        except SystemExit as stop:   # a plugin must not end the run: that would exit 0 with nothing done
            raise UserError(f"--plugin {raw}: called sys.exit({stop.code!r}) while loading") from None
        except BaseException as err:  # noqa: BLE001 - the user's file failed: one line naming it
            raise UserError(f"--plugin {raw}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") \
                from None
        check_registrations(raw, module, before)
        _loaded[str(path)] = module
