"""Where data, runs and caches live, for `--compute local` and `--compute cluster`.

local    data root  = the embedded demo dataset, generated on first use into <cache>/demo/brain
         output root = <repo>/runs (an installed, non-editable medgen: ./runs)
         cache root  = $MEDGEN_CACHE or <repo>/.cache (installed: ~/.cache/medgen)
cluster  every root comes from the environment (set them in your ~/.bashrc or the SLURM script):
         MEDGEN_DATA_ROOT    folder holding the datasets (required)
         MEDGEN_OUTPUT_ROOT  folder for run folders and generated datasets (required)
         MEDGEN_CACHE        slice cache (default: $MEDGEN_OUTPUT_ROOT/.cache)
auto     cluster when MEDGEN_DATA_ROOT and MEDGEN_OUTPUT_ROOT are set, else local: what generate.py and the
         evaluation scripts use (--compute), so that their caches land where training's do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medgen.common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]     # the checkout (or, installed, site-packages/medgen)
IN_CHECKOUT = (REPO_ROOT / "medgen" / "__init__.py").is_file()
COMPUTE_CHOICES = ("local", "cluster", "auto")
CLUSTER_VARS = ("MEDGEN_DATA_ROOT", "MEDGEN_OUTPUT_ROOT")


@dataclass(frozen=True)
class PathConfig:
    compute: str
    data_root: Path
    output_root: Path
    cache_root: Path

    @classmethod
    def from_compute(cls, compute: str, env: dict | None = None) -> "PathConfig":
        env = os.environ if env is None else env
        if compute not in COMPUTE_CHOICES:
            raise UserError(f"--compute must be one of {', '.join(COMPUTE_CHOICES)}, got {compute!r}")
        if compute == "auto":
            compute = "cluster" if all(env.get(k) for k in CLUSTER_VARS) else "local"
        if compute == "local":
            # an empty variable counts as unset; an installed package never writes into site-packages
            default = REPO_ROOT / ".cache" if IN_CHECKOUT else Path.home() / ".cache" / "medgen"
            cache = Path(env.get("MEDGEN_CACHE") or default)
            return cls(compute, cache / "demo" / "brain", (REPO_ROOT if IN_CHECKOUT else Path.cwd()) / "runs", cache)
        missing = [k for k in CLUSTER_VARS if not env.get(k)]
        if missing:
            raise UserError(f"--compute cluster needs the environment variable(s) {', '.join(missing)} "
                            "(data and output roots on the cluster; see config/paths.py)")
        out = Path(env["MEDGEN_OUTPUT_ROOT"])
        return cls(compute, Path(env["MEDGEN_DATA_ROOT"]), out, Path(env.get("MEDGEN_CACHE") or out / ".cache"))

    @property
    def demo_root(self) -> Path:
        return self.cache_root / "demo"

    @property
    def slice_cache(self) -> Path:
        """Where the preprocessed slice caches of every command live (common/dataset.py)."""
        return self.cache_root / "slices"

    def default_data_dir(self, image_folder: bool = False) -> Path:
        """The dataset used when no --data_dir is given; locally the demo data, built on first use."""
        if self.compute == "cluster":
            return self.data_root
        from medgen.Generation.TrainGen.core.phantom import ensure_demo_data
        ensure_demo_data(self.demo_root)
        return self.demo_root / ("lesions" if image_folder else "brain")
