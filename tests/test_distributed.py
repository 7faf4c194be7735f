"""Two CPU processes under torchrun with the gloo backend, and a run killed with SIGKILL that resumes."""
import json
import signal
import subprocess
import sys
import time

from medgen.Generation.TrainGen.core.checkpoint import list_checkpoints, load_checkpoint
from tests.conftest import ROOT, background, run_script, torchrun


def test_gloo_ddp_replicas_stay_equal(demo_root, tmp_path):
    res = torchrun("tests/ddp_worker.py", str(demo_root), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"world": 2, "equal": True, "noise_differs": True, "data_disjoint": True, "steps": 4}


def test_train_py_under_torchrun_multi_gpu(demo_root, tmp_path):
    res = torchrun("Generation/TrainGen/train.py", "--multi_gpu", "--config", "config/tiny.yaml",
                   "--data_dir", str(demo_root / "brain"), "--run_dir", str(tmp_path / "run"), "--epochs", "1",
                   "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "strategy.sample_steps=3",
                   "--set", "runtime.num_val_samples=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "run" / "train.log").read_text()
    assert (tmp_path / "run" / "samples" / "epoch_0001.png").is_file()
    assert len(load_checkpoint(tmp_path / "run")["rng"]) == 2


def test_sigkill_then_resume_auto_finishes(demo_root, tmp_path):
    args = ["--config", "config/tiny.yaml", "--data_dir", str(demo_root / "brain"), "--run_dir", str(tmp_path / "run"),
            "--epochs", "40", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "runtime.val_interval=100",
            "--set", "strategy.sample_steps=4", "--set", "runtime.num_val_samples=4", "--resume", "auto"]
    with background([sys.executable, "Generation/TrainGen/train.py", *args], cwd=ROOT,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.time() + 120
        while time.time() < deadline and not list_checkpoints(tmp_path / "run"):
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = load_checkpoint(tmp_path / "run")
    assert 0 < killed_at["step"] and killed_at["epoch"] < 3
    res = run_script("Generation/TrainGen/train.py", *args, "--epochs", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()
    final = load_checkpoint(tmp_path / "run")
    assert final["epoch"] == 3 and final["step"] > killed_at["step"]
