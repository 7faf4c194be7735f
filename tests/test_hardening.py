"""Hostile input: each case gets one clear line (naming the file or flag) before any work and a non-zero exit,
and nothing already written is lost or left broken."""
import os
import time

import pytest
import torch
from PIL import Image

from medgen.common.fileio import safe_load
from medgen.Generation.TrainGen.core.checkpoint import list_checkpoints, load_checkpoint
from medgen.common.errors import UserError
from medgen.common.fileio import remove_stale_tmp
from medgen.Generation.TrainGen.core.run import train
from medgen.Generation.TrainGen.generate import main as generate_main
from tests.conftest import run_script
from tests.test_training import make_trainer, tiny_cfg

TRAIN, GEN, EVAL = "Generation/TrainGen/train.py", "Generation/TrainGen/generate.py", "eval/obj_eval/run_evaluation.py"


# ---------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("lr", ["inf", "nan", "0", "-1e-3"])
def test_non_finite_or_non_positive_lr_is_refused(lr, tmp_path):
    res = run_script(TRAIN, f"--lr={lr}", "--max_steps", "5", "--run_dir", str(tmp_path / "run"))
    assert res.returncode == 2 and "--lr) must be a finite number in (0, 10]" in res.stderr, res.stderr[-500:]
    assert not (tmp_path / "run").exists()


def test_weights_that_became_non_finite_are_never_saved(demo_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    tr = make_trainer(tiny_cfg(demo_root, tmp_path), run)
    tr.train_step([tr.train_data.batch(torch.arange(8))])
    tr.checkpoint(False)
    saved = list_checkpoints(run)
    with torch.no_grad():
        next(tr.net.parameters()).fill_(float("inf"))
    tr.step += 1
    with pytest.raises(UserError, match="weights became NaN/inf by optimizer step 2"):
        tr.checkpoint(False)
    assert list_checkpoints(run) == saved


def test_generation_refuses_a_checkpoint_with_non_finite_weights(tiny_models, tmp_path):
    state = load_checkpoint(tiny_models["bravo_rflow"])
    for group in ("model", "ema"):
        for k, v in (state[group] or {}).items():
            if v.is_floating_point():
                v.fill_(float("nan"))
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(UserError, match="diverged.pt: the weights hold NaN/inf"):
        generate_main(["--image_model", str(tmp_path / "diverged.pt"), "--masks_from", "x", "--output_dir",
                       str(tmp_path / "out"), "--device", "cpu"])


# ---------------------------------------------------------------- corrupt caches and checkpoints
def test_damaged_slice_cache_is_rebuilt(demo_root, tmp_path, capsys):
    cfg = tiny_cfg(demo_root, tmp_path, optim={"max_steps": 1})
    make_trainer(cfg)
    caches = sorted((tmp_path / "cache").glob("*.pt"))
    assert caches
    for c in caches:
        c.write_bytes(c.read_bytes()[:64])
    tr = make_trainer(cfg)
    assert len(tr.train_data) > 0 and "unreadable slice cache" in capsys.readouterr().err
    assert all(torch.load(c, weights_only=True) for c in sorted((tmp_path / "cache").glob("*.pt")))


def test_resume_auto_passes_over_a_corrupt_newest_checkpoint(demo_root, tmp_path, capsys):
    cfg = tiny_cfg(demo_root, tmp_path, optim={"max_steps": 4, "epochs": 1}, runtime={"val_interval": 100})
    assert train(cfg) == 0
    files = list_checkpoints(tmp_path / "run")
    assert len(files) >= 1
    newest = files[-1]
    older = tmp_path / "run" / "ckpt_00000001.pt"
    older.write_bytes(newest.read_bytes())           # an intact older one
    newest.write_bytes(newest.read_bytes()[:100])     # the newest one damaged
    state = load_checkpoint(tmp_path / "run", print)
    out = capsys.readouterr().out
    assert state["step"] >= 1 and f"{newest}: not a loadable checkpoint" in out and "newest intact" in out


def test_refusal_never_suggests_weights_only_false(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": slice(1, 2)}, path)   # a Python object that weights_only loading refuses
    with pytest.raises(UserError) as err:
        safe_load(path, "checkpoint")
    assert "weights_only" not in str(err.value) and "not a loadable checkpoint" in str(err.value)


# ---------------------------------------------------------------- flags checked before any work
@pytest.mark.parametrize("args, message", [
    (["--num_steps", "0"], "--num_steps must be at least 1, got 0"),
    (["--num_steps", "-3"], "--num_steps must be at least 1, got -3"),
    (["--max_attempts", "0"], "--max_attempts must be at least 1"),
])
def test_generate_step_counts_are_checked(args, message, tmp_path):
    with pytest.raises(UserError, match=message):
        generate_main(["--image_model", "nowhere", "--output_dir", str(tmp_path / "o"), *args])


def test_generate_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="--output_dir .*f: exists and is not a folder"):
        generate_main(["--image_model", "nowhere", "--output_dir", str(tmp_path / "f")])


@pytest.mark.parametrize("args, message", [
    (["--max_steps", "-1"], "optim.max_steps (--max_steps) must be in [1, 10000000]"),
    (["--set", "optim=3", "--lr", "1e-3"], "--set optim=3: optim is a section"),
    (["--set", "data.crop_size=3"], "data.crop_size must be at least 8"),
    (["--strategy", "foo"], "--strategy 'foo' is unknown"),
    (["--strategy", "rflow", "--set", "strategy.sampler=ddim"], "sampler 'ddim' does not fit strategy 'rflow'"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume: checkpoint not found: /nonexistent/ckpt.pt"),
    (["--init_from", "/nonexistent/run"], "--init_from: checkpoint not found: /nonexistent/run"),
])
def test_training_flags_fail_before_any_work(args, message, tmp_path):
    env = {"MEDGEN_CACHE": str(tmp_path / "cache")}
    res = run_script(TRAIN, "--config", "config/tiny.yaml", "--run_dir", str(tmp_path / "run"), *args, env=env)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-800:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "slices").exists()


def test_tiny_images_and_empty_class_folder_are_reported_once(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (16, 16), 40 * i).save(root / cls / f"{i}.png")
    Image.new("L", (1, 1), 9).save(root / "a" / "tiny.png")
    (root / "c").mkdir()
    res = run_script(TRAIN, "--check_data", "--data_dir", str(root), "--mode", "class",
                     env={"MEDGEN_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 1 and "a/tiny.png: image is 1x1 px: too small" in res.stderr
    assert res.stderr.count("c: empty class folder") == 1, res.stderr


def test_mixed_sizes_in_a_synthetic_folder_are_warned(tmp_path, demo_root):
    synth = tmp_path / "synth"
    for i, size in enumerate((32, 32, 48)):
        (synth / "a").mkdir(parents=True, exist_ok=True)
        Image.new("L", (size, size), 30 + i).save(synth / "a" / f"{i}.png")
    res = run_script("eval/obj_eval/metrics/ms_ssim.py", "--mode", "diversity", "--synthetic-dir", str(synth),
                     "--real-dir", str(demo_root / "lesions"), "--output", str(tmp_path / "ev"),
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert "holds images of several sizes (32 px, 48 px); all are evaluated at 32 px" in res.stderr, res.stderr


# ---------------------------------------------------------------- small things
def test_skip_bad_is_accepted_where_the_hint_suggests_it(tiny_models, demo_root, tmp_path):
    import shutil
    real = tmp_path / "real"
    shutil.copytree(demo_root / "brain" / "val", real)
    for name in ("seg.nii.gz", "bravo.nii.gz"):   # generation reads the masks, evaluation the images
        bad = next(real.iterdir()) / name
        bad.write_bytes(bad.read_bytes()[:40])
    env = {"MEDGEN_CACHE": str(tmp_path / "c")}
    res = run_script(GEN, "--image_model", str(tiny_models["bravo_rflow"]), "--masks_from", str(real), "--num_images",
                     "2", "--num_steps", "2", "--output_dir", str(tmp_path / "g"), "--device", "cpu", env=env)
    assert res.returncode == 2 and "--skip_bad" in res.stderr
    res = run_script(GEN, "--image_model", str(tiny_models["bravo_rflow"]), "--masks_from", str(real), "--num_images",
                     "2", "--num_steps", "2", "--output_dir", str(tmp_path / "g"), "--device", "cpu", "--skip_bad",
                     env=env)
    assert res.returncode == 0, res.stderr[-800:]
    res = run_script(EVAL, "--synthetic-dir", str(tmp_path / "g"), "--real-dir", str(real), "--metrics", "mae",
                     "--output", str(tmp_path / "ev"), env=env)
    assert res.returncode == 2 and "--skip_bad" in res.stderr
    res = run_script(EVAL, "--synthetic-dir", str(tmp_path / "g"), "--real-dir", str(real), "--metrics", "mae",
                     "--output", str(tmp_path / "ev"), "--skip_bad", env=env)
    assert res.returncode == 0, res.stderr[-800:]


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / "s").mkdir()
    old, new = tmp_path / "s" / ".x.nii.gz.abc.tmp", tmp_path / ".ckpt.pt.def.tmp"
    old.write_text("left by a kill")
    new.write_text("being written")
    past = time.time() - 3600
    os.utime(old, (past, past))
    keep = tmp_path / "ckpt_00000001.pt"
    keep.write_text("kept")
    assert remove_stale_tmp(tmp_path, older_than_s=600) == 1 and not old.exists() and new.exists()
    assert remove_stale_tmp(tmp_path) == 1 and not new.exists() and keep.exists()


def test_training_log_has_no_empty_last_line_and_names_val_loss(demo_root, tmp_path):
    cfg = tiny_cfg(demo_root, tmp_path, optim={"epochs": 1}, runtime={"val_interval": 1, "log_interval": 3})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".ckpt_00000002.pt.zz.tmp").write_text("left by a killed save")
    assert train(cfg) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "loss=0 " not in log and "images_per_s=0 " not in log
    assert "val_loss=" in log
    assert not list((tmp_path / "run").glob(".*.tmp"))
