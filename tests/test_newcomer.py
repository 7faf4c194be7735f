"""A newcomer's first runs: a short run bounded by --max_steps still ends with a sample grid, best.pt and a
learning rate that has decayed over its own length."""
from __future__ import annotations

import torch

from medgen.Generation.TrainGen.core.run import train
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


def test_a_chain_from_an_untrained_seg_model_stops_fast_and_says_why(tiny_models, tmp_path):
    import time

    from tests.conftest import run_script
    t0 = time.perf_counter()
    res = run_script("Generation/TrainGen/generate.py", "--seg_model", str(tiny_models["seg"]), "--image_model",
                     str(tiny_models["bravo"]), "--num_images", "40", "--batch_size", "8", "--num_steps", "3",
                     "--sampler", "ddim", "--seg_sampler", "ddim", "--seg_num_steps", "3",
                     "--output_dir", str(tmp_path / "out"), "--device", "cpu")
    assert time.perf_counter() - t0 < 30
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "the first 24 masks from the seg model were all rejected" in line and "--no_mask_filter" in line
    res = run_script("Generation/TrainGen/generate.py", "--seg_model", str(tiny_models["seg"]), "--image_model",
                     str(tiny_models["bravo"]), "--num_images", "4", "--batch_size", "4", "--num_steps", "3",
                     "--sampler", "ddim", "--seg_sampler", "ddim", "--seg_num_steps", "3", "--no_mask_filter",
                     "--output_dir", str(tmp_path / "smoke"), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-1500:]


def test_the_mask_filter_has_a_pixel_floor():
    import numpy as np

    from medgen.Generation.TrainGen.core.generation.conditions import MaskFilter
    one = np.zeros((32, 32))
    one[3, 3] = 1                                        # 1/1024 of the image passes 0.0005, not 4 pixels
    assert MaskFilter().reason(one) == "too small"
    one[3:5, 3:5] = 1
    assert MaskFilter().reason(one) is None and MaskFilter(enabled=False).reason(np.zeros((8, 8))) is None


def test_unconditional_samples_from_a_guidance_model(tiny_models, tmp_path):
    from tests.conftest import run_script
    out = tmp_path / "u"
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tiny_models["class"]), "--class_counts",
                     "none=2", "--num_steps", "2", "--sampler", "ddim", "--output_dir", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-1500:]
    assert len(list((out / "unconditional").glob("*.png"))) == 2


def test_symlinked_subject_folders_read_everywhere(demo_root, tmp_path):
    import os

    from medgen.common.data import is_nifti_dataset
    from medgen.eval.obj_eval.core.inputs import load_set
    linked = tmp_path / "linked"
    linked.mkdir()
    for subject in sorted((demo_root / "brain" / "val").iterdir()):
        os.symlink(subject, linked / subject.name)
    assert is_nifti_dataset(linked)
    assert len(load_set(linked)) == len(load_set(demo_root / "brain" / "val"))


def test_generation_says_when_it_samples_unlike_the_validation_grids(tiny_models, tmp_path):
    from tests.conftest import run_script
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tiny_models["class"]), "--num_images",
                     "1", "--num_steps", "2", "--sampler", "ddim", "--output_dir", str(tmp_path / "o"), "--device", "cpu")
    assert res.returncode == 0 and "its validation grids were drawn with ddpm-" in res.stdout
    assert "this run samples with ddim-2" in res.stdout
    # without --sampler / --num_steps it samples as the grids did: the run's sampler and strategy.sample_steps
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tiny_models["class"]), "--num_images",
                     "1", "--output_dir", str(tmp_path / "d"), "--device", "cpu")
    import csv
    rows = list(csv.DictReader(open(tmp_path / "d" / "manifest.csv")))
    assert res.returncode == 0 and "validation grids were drawn" not in res.stdout
    assert (rows[0]["sampler"], rows[0]["steps"]) == ("ddpm", "5")        # the test runs set sample_steps 5


def test_fine_tuning_a_class_run_onto_a_subset_and_a_new_class(tiny_models, demo_root, tmp_path):
    import shutil

    from tests.conftest import run_script
    data = tmp_path / "lesions"
    shutil.copytree(demo_root / "lesions" / "nevus", data / "nevus")
    shutil.copytree(demo_root / "lesions" / "melanoma", data / "other")          # a class the source never saw
    run = tmp_path / "ft"
    res = run_script("Generation/TrainGen/train.py", "--config", "config/tiny.yaml", "--mode", "class", "--data_dir",
                     str(data), "--init_from", str(tiny_models["class"]), "--max_steps", "1", "--run_dir", str(run),
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-1500:]
    log = (run / "train.log").read_text()
    assert "class embedding mapped by name: kept nevus; new other, starting from the unconditional embedding" in log
    assert "dropped melanoma, vascular" in log
    bad = tmp_path / "bad"                             # a seg run's weights do not fit a class network
    res = run_script("Generation/TrainGen/train.py", "--config", "config/tiny.yaml", "--mode", "class", "--data_dir",
                     str(data), "--init_from", str(tiny_models["seg"]), "--max_steps", "1", "--run_dir", str(bad),
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 2 and "incompatible architecture" in res.stderr and not bad.exists()
