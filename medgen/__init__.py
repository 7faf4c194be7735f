"""medgen: synthetic medical images with diffusion models.

The seed's folders (Generation/, common/, config/, eval/) are this package's subpackages: in a checkout (and an
editable install) they stay where the seed put them, so `python Generation/TrainGen/train.py` and the other
script paths keep working, and `medgen.common`, `medgen.Generation.TrainGen.core`, ... are the same files. An
installed distribution claims one top-level name, `medgen`, and nothing as generic as `common` or `config`.
"""
from __future__ import annotations

from pathlib import Path as _Path

_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "common" / "__init__.py").is_file() and not (_Path(__file__).parent / "common").is_dir():
    __path__.append(str(_ROOT))   # noqa: F821 - a checkout: medgen.common is <root>/common, and so on

# The public API, imported on first use (`import medgen` stays light; `medgen --help` loads no torch):
#   load(path) -> Pipeline; Pipeline.sample(...) -> Samples; Samples.save(dir)      medgen/api.py
#   train(config, **flags) -> run folder; evaluate(synthetic, real, ...) -> dict; utility(real, synthetic, ...)
#   export(run, out) (medgen/exports.py); fetch_weights(kind) (medgen/weights.py)
#   MODES, STRATEGIES and their base classes, to register your own (docs/training.md)
_API = {
    "load": "medgen.api", "train": "medgen.api", "evaluate": "medgen.api", "utility": "medgen.api",
    "Pipeline": "medgen.api", "Samples": "medgen.api", "export": "medgen.exports", "fetch_weights": "medgen.weights",
    "UserError": "medgen.common.errors", "build_config": "medgen.Generation.TrainGen.core.config",
    "MODES": "medgen.Generation.TrainGen.core.modes", "TrainingMode": "medgen.Generation.TrainGen.core.modes",
    "Mode": "medgen.Generation.TrainGen.core.modes", "STRATEGIES": "medgen.Generation.TrainGen.core.strategies",
    "DiffusionStrategy": "medgen.Generation.TrainGen.core.strategies",
    "Strategy": "medgen.Generation.TrainGen.core.strategies",
    "DDPMStrategy": "medgen.Generation.TrainGen.core.strategies.ddpm",
    "RFlowStrategy": "medgen.Generation.TrainGen.core.strategies.rflow",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'medgen' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_API[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
