"""One path resolution everywhere, flat image folders as evaluation sets, and --check_data without --mode
checking every modality a subject has."""
import json

import numpy as np
from PIL import Image

from medgen.config.paths import REPO_ROOT, PathConfig
from tests.conftest import run_script
from tests.helpers_nifti import mask_volume, pattern_volume, save


def test_auto_compute_follows_the_environment(tmp_path):
    env = {"MEDGEN_DATA_ROOT": str(tmp_path / "d"), "MEDGEN_OUTPUT_ROOT": str(tmp_path / "o")}
    assert PathConfig.from_compute("auto", env).cache_root == tmp_path / "o" / ".cache"
    assert PathConfig.from_compute("auto", {}).cache_root == REPO_ROOT / ".cache"


def test_evaluation_caches_land_under_the_cluster_output_root(tmp_path, demo_root):
    env = {"MEDGEN_DATA_ROOT": str(tmp_path / "d"), "MEDGEN_OUTPUT_ROOT": str(tmp_path / "out"), "MEDGEN_CACHE": ""}
    res = run_script("eval/obj_eval/metrics/mae_psnr.py", "--synthetic-dir", str(demo_root / "brain" / "val"),
                     "--real-dir", str(demo_root / "brain" / "val"), "--output", str(tmp_path / "ev"), env=env)
    assert res.returncode == 0, res.stderr[-1000:]
    assert list((tmp_path / "out" / ".cache" / "slices").glob("*.pt"))


def _flat(folder, values):
    folder.mkdir(parents=True)
    for name, v in values.items():
        Image.fromarray(np.full((24, 24), v, np.uint8)).save(folder / name)


def test_flat_png_folders_pair_by_file_name(tmp_path):
    _flat(tmp_path / "real", {"0001.png": 100, "0002.png": 150, "0003.png": 200})
    _flat(tmp_path / "synth", {"0001.png": 110, "0002.png": 150, "0004.png": 10})
    res = run_script("eval/obj_eval/run_evaluation.py", "--synthetic-dir", str(tmp_path / "synth"), "--real-dir",
                     str(tmp_path / "real"), "--metrics", "mae,psnr,ms_ssim", "--output", str(tmp_path / "ev"),
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-1500:]
    recs = {r["metric"]: r for r in json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]}
    assert recs["mae"]["n"] == 2 and recs["mae"]["method"]["pairs_by"] == "sample id"
    assert abs(recs["mae"]["value"] - (10 / 255) / 2) < 1e-3       # 0001 differs by 10 grey levels, 0002 equal
    assert recs["ms_ssim_diversity"]["n"] == 3 and "within_condition" in recs["ms_ssim_diversity"]


def test_check_data_without_mode_checks_every_modality(tmp_path):
    for s in ("a", "b", "c"):
        save(tmp_path / s / "bravo.nii.gz", pattern_volume("ring"))
        save(tmp_path / s / "seg.nii.gz", mask_volume())
    bad = pattern_volume("left")
    bad[2, 2, 2] = np.nan
    save(tmp_path / "b" / "t1_pre.nii.gz", bad)
    env = {"MEDGEN_CACHE": str(tmp_path / "c")}
    res = run_script("Generation/TrainGen/train.py", "--check_data", "--data_dir", str(tmp_path), env=env)
    assert res.returncode == 1 and "b/t1_pre.nii.gz: 1 NaN/inf voxels" in res.stderr, res.stderr[-800:]
    res = run_script("Generation/TrainGen/train.py", "--check_data", "--data_dir", str(tmp_path), "--mode", "bravo",
                     env=env)
    assert res.returncode == 0 and "modalities bravo, seg" in res.stdout    # the mode's files only
