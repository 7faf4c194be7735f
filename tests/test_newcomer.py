"""A newcomer's first runs: a short run bounded by --max_steps still ends with a sample grid, best.pt and a
learning rate that has decayed over its own length."""
from __future__ import annotations

import torch

from Generation.TrainGen.core.run import train
from tests.test_training import tiny_cfg


def test_a_ten_step_run_leaves_a_grid_best_pt_and_a_decayed_lr(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, "bravo", "rflow", optim={"max_steps": 10, "epochs": 30},
                   runtime={"val_interval": 30})                  # the first validation would be at epoch 30
    assert train(cfg) == 0
    run = tmp_path / "run"
    assert list((run / "samples").glob("*.png")) and (run / "best.pt").is_file()
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["step"] == 10
    lr = state["opt"]["param_groups"][0]["lr"]
    assert lr < 1e-3 * cfg.optim.lr                   # the cosine schedule ran over the 10 steps, not 30 epochs
