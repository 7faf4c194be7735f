import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Generation.TrainGen.core.phantom import ensure_demo_data  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo dataset (8 subjects of 32x32x24 + lesion folders), built once per test session."""
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo", n_subjects=8, shape=(32, 32, 24))


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300):
    """Run one of the public scripts as a user would: python <path> ... from the repository root."""
    import os
    import subprocess
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_models(demo_root, tmp_path_factory) -> dict:
    """Run folders of tiny models trained for a few steps: seg and bravo (DDPM), bravo (RFlow), class (DDPM).
    Only the machinery is under test here, not sample quality."""
    from Generation.TrainGen.core.run import train
    from tests.test_training import tiny_cfg
    root = tmp_path_factory.mktemp("models")
    runs = {}
    for name, mode, strategy in [("seg", "seg", "ddpm"), ("bravo", "bravo", "ddpm"), ("bravo_rflow", "bravo", "rflow"),
                                 ("class", "class", "ddpm")]:
        cfg = tiny_cfg(demo_root, root / name, mode, strategy, optim={"max_steps": 4}, runtime={"val_interval": 100})
        assert train(cfg) == 0
        runs[name] = root / name / "run"
    return runs
