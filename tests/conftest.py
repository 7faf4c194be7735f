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
