"""Bad input: one line per problem naming the file, a non-zero exit, never a traceback."""
import gzip

import numpy as np
import pytest

from tests.conftest import run_script
from tests.helpers_nifti import mask_volume, pattern_volume, save

TRAIN = "Generation/TrainGen/train.py"


def good_subject(folder, shape=(24, 24, 8)):
    save(folder / "bravo.nii.gz", pattern_volume("ring", shape))
    save(folder / "seg.nii.gz", mask_volume(shape))


def truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def nan_volume(folder):
    vol = pattern_volume("ring")
    vol[3, 3, 3] = np.nan
    save(folder / "bravo.nii.gz", vol)


BAD = {
    "truncated": (lambda d: truncate(d / "bravo.nii.gz"), "bravo.nii.gz: unreadable or truncated"),
    "mismatched_shape": (lambda d: save(d / "seg.nii.gz", mask_volume((24, 24, 6))), "shape (24, 24, 8) differs"),
    "nan": (nan_volume, "bravo.nii.gz: 1 NaN/inf voxels"),
    "missing_modality": (lambda d: (d / "bravo.nii.gz").unlink(), "missing modality 'bravo'"),
    "affine": (lambda d: save(d / "seg.nii.gz", mask_volume(), np.diag([2.0, 2, 2, 1])), "affine differs"),
    # the original layout holds binary masks or BraTS 2021 label maps (0, 1, 2, 4): a 3 is neither
    "non_binary": (lambda d: save(d / "seg.nii.gz", mask_volume(labels=(1, 3))), "mask values {3} are not labels"),
    "all_zero": (lambda d: save(d / "bravo.nii.gz", np.zeros((24, 24, 8), np.float32)), "all-zero image"),
    "four_d": (lambda d: save(d / "bravo.nii.gz", np.ones((24, 24, 8, 2), np.float32)), "wrong dimensionality: 4D"),
    "not_gzip": (lambda d: (d / "bravo.nii.gz").write_bytes(b"not a nifti at all"), "unreadable or truncated"),
}


def check(root, *extra, env=None):
    return run_script(TRAIN, "--check_data", "--data_dir", str(root), "--mode", "bravo", *extra,
                      env={"MEDGEN_CACHE": str(root.parent / "cache"), **(env or {})})


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_input_has_its_message(tmp_path, kind):
    root = tmp_path / "data"
    good_subject(root / "train" / "ok")
    good_subject(root / "train" / "bad")
    BAD[kind][0](root / "train" / "bad")
    res = check(root)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if BAD[kind][1] in ln]
    assert len(lines) == 1 and "train/bad" in lines[0], res.stderr
    assert "train/ok" not in res.stderr


def test_three_problems_named_together_and_skip_bad(tmp_path):
    root = tmp_path / "data"
    for name in ("ok1", "ok2", "trunc", "shape", "nan"):
        good_subject(root / "train" / name)
    truncate(root / "train" / "trunc" / "bravo.nii.gz")
    save(root / "train" / "shape" / "seg.nii.gz", mask_volume((24, 24, 6)))
    nan_volume(root / "train" / "nan")
    res = check(root)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    for name in ("trunc", "shape", "nan"):
        assert f"train/{name}/" in res.stderr
    res = check(root, "--skip_bad")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("skipped: ") == 3 and "train: 16 slices" in res.stdout


def test_truncated_gzip_that_passes_header_read(tmp_path):
    """The header and most of the data decompress; only the last voxels are missing."""
    root = tmp_path / "data"
    good_subject(root / "train" / "s")
    path = root / "train" / "s" / "bravo.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[:-12])  # drop the gzip trailer and a few bytes of the stream
    import nibabel as nib
    nib.load(str(path))  # the header alone still loads
    res = check(root)
    assert res.returncode == 1 and "unreadable or truncated" in res.stderr and "Traceback" not in res.stderr


def test_empty_folder_and_bad_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    res = check(tmp_path / "empty")
    assert res.returncode == 2 and "no subject folders found" in res.stderr and "Traceback" not in res.stderr
    res = run_script(TRAIN, "--check_data", "--mode", "nosuch", "--data_dir", str(tmp_path))
    assert res.returncode == 2 and "--mode 'nosuch' is unknown" in res.stderr


def test_corrupt_image_in_class_folder(tmp_path):
    root = tmp_path / "imgs"
    from PIL import Image
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 50).save(root / cls / f"{i}.png")
    (root / "b" / "1.png").write_bytes(b"\x89PNG broken")
    (root / "c").mkdir()
    res = run_script(TRAIN, "--check_data", "--data_dir", str(root), "--mode", "class",
                     env={"MEDGEN_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "b/1.png: unreadable image" in res.stderr and "c: empty class folder" in res.stderr


def test_good_demo_data_passes(demo_root, tmp_path):
    res = check(demo_root / "brain")
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr
