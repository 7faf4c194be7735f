import math

import pytest
import torch

from medgen.Generation.TrainGen.core.checkpoint import list_checkpoints, load_checkpoint
from medgen.Generation.TrainGen.core.config import build_config, load_yaml
from medgen.common.dataset import SliceData
from medgen.Generation.TrainGen.core.datasource import data_source
from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.modes import MODES
from medgen.Generation.TrainGen.core.modes.base import Mode
from medgen.Generation.TrainGen.core.run import train
from medgen.Generation.TrainGen.core.runtime import init_runtime
from medgen.Generation.TrainGen.core.strategies import STRATEGIES
from medgen.Generation.TrainGen.core.strategies.ddpm import DDPMStrategy
from medgen.Generation.TrainGen.core.trainer import DiffusionTrainer
from medgen.config.paths import REPO_ROOT

TINY = load_yaml(REPO_ROOT / "config" / "tiny.yaml")


def tiny_cfg(demo_root, tmp_path, mode_name="bravo", strategy_name="ddpm", **sections):
    data_dir = demo_root / ("lesions" if mode_name == "class" else "brain")
    layers = [TINY, {"mode": {"name": mode_name}, "strategy": {"name": strategy_name, "sample_steps": 5},
                     "data": {"data_dir": str(data_dir), "cache_dir": str(tmp_path / "cache")},
                     "runtime": {"num_val_samples": 4, "log_interval": 2}, "paths": {"run_dir": str(tmp_path / "run")}}]
    return build_config(*layers, sections)


def make_trainer(cfg, run_dir=None):
    rt = init_runtime(cfg.runtime)
    src = data_source(cfg)
    return DiffusionTrainer(cfg, rt, src.split(cfg.data, "train"), src.split(cfg.data, "val"), run_dir)


TINY3D = load_yaml(REPO_ROOT / "config" / "tiny3d.yaml")


def dims_sections(dims: int) -> dict:
    """Config sections of a run in 2D (the tiny preset's slices) or 3D (16x16x8 volumes, batch 2)."""
    return {} if dims == 2 else {"data": TINY3D["data"], "optim": {"batch_size": 2}}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_strategy_and_mode_trains_and_samples(demo_root, tmp_path, mode, strategy, dims):
    if dims == 3 and MODES[mode].image_folder:
        pytest.skip("class mode reads 2D image folders")
    cfg = tiny_cfg(demo_root, tmp_path, mode, strategy, mode={"segment": {"ensemble": 2}}, **dims_sections(dims))
    run = tmp_path / "run"
    run.mkdir()
    tr = make_trainer(cfg, run)
    assert tr.train_data.spatial_dims == dims
    before = [p.detach().clone() for p in tr.net.parameters()]
    order = tr.train_data.batch_indices(8 if dims == 2 else 2, 0, 0)
    for i in range(3):
        assert tr.train_step([tr.train_data.batch(order[i])]).item() == 0
    assert tr.step == 3 and any(not torch.equal(a, b) for a, b in zip(before, tr.net.parameters()))
    assert tr.validate() is True
    tr.checkpoint(is_best=True)
    state = load_checkpoint(run)
    assert state["meta"]["mode"] == mode and state["meta"]["strategy"] == strategy and state["step"] == 3
    assert (run / "best.pt").is_file()


def test_tiny_model_overfits_one_batch(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, "bravo", "rflow", optim={"lr": 1e-2, "min_snr": False})
    tr = make_trainer(cfg)
    batch = tr.train_data.batch(torch.arange(8))
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(8, 1, 32, 32, generator=g), tr.strategy.sample_times(8, g, "cpu")
    losses = []
    for _ in range(150):
        loss, _, _ = tr.loss(batch, noise, t)
        loss.backward()
        tr.opt.step()
        tr.opt.zero_grad()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:     # reached (about step 75): the remaining steps would only spend time
            break
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def final_weights(run_dir):
    state = load_checkpoint(run_dir)
    return state["step"], state["model"], state["ema"]


@pytest.mark.parametrize("dims", [2, 3])
def test_resume_is_bit_exact(demo_root, tmp_path, dims):
    data = dims_sections(dims).get("data", {})
    common = {"optim": {"epochs": 3 if dims == 2 else 4, "batch_size": 16 if dims == 2 else 2, "max_steps": 12},
              "runtime": {"val_interval": 1, "log_interval": 6}}
    straight = tiny_cfg(demo_root, tmp_path / "a", optim=common["optim"], runtime=common["runtime"], data=data)
    train(straight)
    # the same job preempted at step 6 (the SLURM trap's .preempt, read at the log interval), then resumed
    (tmp_path / "b" / "run").mkdir(parents=True)
    (tmp_path / "b" / "run" / ".preempt").touch()
    half = tiny_cfg(demo_root, tmp_path / "b", optim=common["optim"], runtime=common["runtime"], data=data)
    train(half)
    assert (tmp_path / "b" / "run" / ".requeue").is_file()
    rest = tiny_cfg(demo_root, tmp_path / "b", optim=common["optim"], runtime={**common["runtime"], "resume": "auto"},
                    data=data)
    train(rest)
    sa, ma, ea = final_weights(tmp_path / "a" / "run")
    sb, mb, eb = final_weights(tmp_path / "b" / "run")
    assert sa == sb == 12
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_nan_guard_skips_and_stops_naming_the_step(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, runtime={"max_nonfinite": 3})
    tr = make_trainer(cfg)
    good = tr.train_data.batch(torch.arange(4))
    assert tr.train_step([good]).item() == 0
    before = [p.detach().clone() for p in tr.net.parameters()]
    bad = {**good, "images": good["images"].clone()}
    bad["images"][0, 0, 0, 0] = float("nan")
    assert tr.train_step([bad]).item() == 1                 # skipped on the device, nothing read back
    assert all(torch.equal(a, b) for a, b in zip(before, tr.net.parameters()))
    assert tr.opt.state[tr.net.conv_in.conv.weight]["step"].item() == 1  # AdamW state untouched too
    tr.check_health()
    assert tr.skipped == 1 and tr.streak == 1
    tr.train_step([good])
    tr.check_health()
    assert tr.streak == 0
    for _ in range(3):
        tr.train_step([bad])
    tr.train_step([good])                                   # a recovery before the check does not hide the streak
    with pytest.raises(UserError, match="3 consecutive non-finite steps by optimizer step 7"):
        tr.check_health()


def test_preemption_request_checkpoints_and_leaves_the_requeue_mark(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, optim={"epochs": 50}, runtime={"log_interval": 2})
    run = tmp_path / "run"
    run.mkdir()
    tr = make_trainer(cfg, run)
    (run / ".preempt").touch()
    assert tr.fit() == "preempted"
    assert tr.step == 2 and (run / ".requeue").is_file() and not (run / ".preempt").exists()
    assert load_checkpoint(run)["step"] == 2


def test_incompatible_init_from_is_refused(demo_root, tmp_path):
    train(tiny_cfg(demo_root, tmp_path / "a", optim={"max_steps": 2}))
    other = tiny_cfg(demo_root, tmp_path / "b", model={"channels": [8, 16, 16]},
                     runtime={"init_from": str(tmp_path / "a" / "run")}, optim={"max_steps": 1})
    with pytest.raises(UserError, match="incompatible architecture"):
        train(other)
    ok = tiny_cfg(demo_root, tmp_path / "c", runtime={"init_from": str(tmp_path / "a" / "run")},
                  optim={"max_steps": 1, "lr": 1e-4})
    assert train(ok) == 0


class X0DDPM(DDPMStrategy):
    """A user-defined strategy: DDPM that predicts the clean sample."""
    name = "ddpm_x0"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prediction = "sample"

    def target(self, x0, noise, t):
        return x0

    def predict_x0(self, pred, x_t, t):
        return pred


class T1GdFromPre(Mode):
    """A user-defined mode: T1-gd given T1-pre and the mask."""
    name = "t1gd_from_pre"
    generated_roles = ["t1_gd"]
    condition_roles = ["t1_pre", "seg"]


def test_user_defined_strategy_and_mode_train(demo_root, tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "ddpm_x0", X0DDPM)
    monkeypatch.setitem(MODES, "t1gd_from_pre", T1GdFromPre)
    cfg = tiny_cfg(demo_root, tmp_path, "t1gd_from_pre", "ddpm_x0", optim={"max_steps": 3})
    assert train(cfg) == 0
    state = load_checkpoint(tmp_path / "run")
    assert state["meta"]["prediction"] == "sample" and state["model"]["conv_in.conv.weight"].shape[1] == 3


def test_find_lr_writes_curve_and_suggestion(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, optim={"find_lr": True, "find_lr_then_train": False, "find_lr_steps": 30})
    assert train(cfg) == 0
    import json
    result = json.loads((tmp_path / "run" / "lr_finder.json").read_text())
    assert 1e-6 <= result["suggested_lr"] <= 1.0 and math.isfinite(result["suggested_lr"])
    assert (tmp_path / "run" / "lr_finder.png").stat().st_size > 1000


def test_segment_mode_reports_dice_and_stops_early(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, "segment", "rflow",
                   optim={"epochs": 50, "lr": 1e-7}, runtime={"val_interval": 1, "early_stop_patience": 2})
    assert train(cfg) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "dice=" in log and "iou=" in log and "early stop" in log


def test_keep_last_prunes_after_writing(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, optim={"epochs": 4}, runtime={"keep_last": 2, "val_interval": 100})
    train(cfg)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert len(names) == 2 and names[-1].endswith(f"{load_checkpoint(tmp_path / 'run')['step']:08d}.pt")


def test_nan_data_never_reaches_training(tmp_path):
    """A slice tensor with NaN cannot come from the cache (the scan rejects it); the guard covers the rest."""
    data = SliceData(torch.full((4, 1, 8, 8), float("nan")).half(), torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
                     None, ["x"] * 4, [0] * 4, ["bravo"])
    assert torch.isnan(data.batch(torch.arange(2))["images"]).all()


def test_wrong_sampler_is_refused_before_training(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, "bravo", "rflow", strategy={"sampler": "ddim"})
    with pytest.raises(UserError, match="sampler 'ddim' does not fit strategy 'rflow'"):
        make_trainer(cfg)


@pytest.mark.parametrize("strategy, flag, expected", [
    ("ddpm", None, True), ("rflow", None, False), ("rflow", True, True), ("ddpm", False, False)])
def test_min_snr_default_is_per_strategy(demo_root, tmp_path, strategy, flag, expected):
    """On for DDPM, off for rectified flow (its velocity weight starves the noisy end); an explicit setting wins.
    The weighting really changes the loss only where it is on."""
    optim = {} if flag is None else {"min_snr": flag}
    tr = make_trainer(tiny_cfg(demo_root, tmp_path, "bravo", strategy, optim=optim))
    assert tr.min_snr is expected
    batch = tr.train_data.batch(torch.arange(4))
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(4, 1, 32, 32, generator=g), tr.strategy.sample_times(4, g, "cpu")
    loss, per, _ = tr.loss(batch, noise, t)
    assert bool(torch.isclose(loss, per.mean())) is (not expected)
