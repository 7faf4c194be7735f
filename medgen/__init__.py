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
