"""Segment new images with a trained segment-mode model: PNG image+mask folders as training data, and
generate.py --images_from on PNG and NIfTI folders, with an ensemble, uncertainty maps and Dice/IoU."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.run import train
from medgen.common.overlap import dice_iou
from medgen.Generation.TrainGen.generate import main as generate_main
from tests.test_training import tiny_cfg


def disk_pairs(root, n, size=32, seed=0, rgb=False):
    """Images with one bright disk on a textured background, and the disk's mask."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(9, size - 9), rng.integers(9, size - 9), rng.integers(4, 8)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = (40 + 30 * rng.random((size, size)) + 160 * mask).astype(np.uint8)
        Image.fromarray(np.stack([img] * 3, -1) if rgb else img).save(root / "images" / f"case{i:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"case{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def png_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_png")
    data = disk_pairs(root / "train", 48)
    cfg = tiny_cfg(root, root, "segment", "rflow", data={"data_dir": str(data), "cache_dir": str(root / "cache")},
                   optim={"max_steps": 60, "lr": 3e-3}, runtime={"val_interval": 1000},
                   paths={"run_dir": str(root / "run")})
    assert train(cfg) == 0
    return root / "run"


def test_dice_iou():
    import torch
    a = torch.zeros(1, 4, 4)
    b = a.clone()
    a[0, :2] = 1
    b[0, 1:3] = 1
    assert dice_iou(a, b) == (0.5, 1 / 3) and dice_iou(a * 0, b * 0) == (1.0, 1.0)


def test_png_pairs_train_and_new_images_are_segmented_with_dice(png_model, tmp_path):
    test = disk_pairs(tmp_path / "test", 6, seed=7)
    out = tmp_path / "out"
    assert generate_main(["--image_model", str(png_model), "--images_from", str(test), "--ensemble", "3",
                          "--num_steps", "10", "--output_dir", str(out), "--device", "cpu"]) == 0
    for kind in ("masks", "mean", "uncertainty"):
        assert sorted(p.name for p in (out / kind).glob("*.png")) == [f"case{i:03d}.png" for i in range(6)]
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(0 <= float(r["dice"]) <= 1 and r["ensemble"] == "3" for r in rows)
    summary = json.loads((out / "segmentation.json").read_text())
    assert summary["images"] == 6 and abs(summary["dice_mean"] - np.mean([float(r["dice"]) for r in rows])) < 1e-9
    assert summary["dice_mean"] > 0.8, summary          # a 60-step model already finds the disks (0.97 seen)
    assert "| Dice" in (out / "segmentation.md").read_text()
    std = np.asarray(Image.open(out / "uncertainty" / "case000.png"))
    assert std.max() > 0                                  # members disagree somewhere
    again = tmp_path / "again"                            # same masks whatever the batch size
    assert generate_main(["--image_model", str(png_model), "--images_from", str(test), "--ensemble", "3",
                          "--num_steps", "10", "--output_dir", str(again), "--device", "cpu", "--batch_size", "2"]) == 0
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"case{i:03d}.png")),
                              np.asarray(Image.open(again / "masks" / f"case{i:03d}.png")))


def test_images_without_masks_and_bad_input(png_model, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 20), 60 + i, np.uint8)).save(flat / f"x{i}.png")
    Image.fromarray(np.full((48, 40), 90, np.uint8)).save(flat / "wide.png")   # not the model's size, not square
    out = tmp_path / "o"
    assert generate_main(["--image_model", str(png_model), "--images_from", str(flat), "--num_steps", "3",
                          "--output_dir", str(out), "--device", "cpu"]) == 0
    assert "dice_mean" not in json.loads((out / "segmentation.json").read_text())
    for name, size in (("x0", (20, 20)), ("wide", (40, 48))):       # PIL sizes are (W, H)
        for folder in ("masks", "mean", "uncertainty"):
            assert Image.open(out / folder / f"{name}.png").size == size   # at the input's geometry
    outside = np.asarray(Image.open(out / "mean" / "wide.png"))
    assert not outside[:4].any() and not outside[-4:].any()           # outside the centred square: nothing
    rgb = disk_pairs(tmp_path / "rgb", 2, rgb=True)
    with pytest.raises(UserError, match="3-channel images; the model was trained on 1-channel"):
        generate_main(["--image_model", str(png_model), "--images_from", str(rgb), "--output_dir",
                       str(tmp_path / "o2"), "--device", "cpu"])
    with pytest.raises(UserError, match="--images_from .*: folder does not exist"):
        generate_main(["--image_model", str(png_model), "--images_from", str(tmp_path / "none"), "--output_dir",
                       str(tmp_path / "o3"), "--device", "cpu"])
    with pytest.raises(UserError, match="--anonymize_sources does not apply to --images_from"):
        generate_main(["--image_model", str(png_model), "--images_from", str(flat), "--anonymize_sources",
                       "--output_dir", str(tmp_path / "o4"), "--device", "cpu"])
    assert not (tmp_path / "o4").exists()


def test_nifti_images_with_masks(demo_root, tmp_path, tiny_models):
    cfg = tiny_cfg(demo_root, tmp_path, "segment", "ddpm", optim={"max_steps": 4}, runtime={"val_interval": 100})
    assert train(cfg) == 0
    out = tmp_path / "nii"
    assert generate_main(["--image_model", str(tmp_path / "run"), "--images_from", str(demo_root / "brain" / "val"),
                          "--num_steps", "3", "--sampler", "ddim", "--output_dir", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert rows and all(r["source"].split("#")[1].startswith("slice") and r["dice"] != "" for r in rows)
    assert (out / "sample_000000" / "seg.nii.gz").is_file() and (out / "sample_000000" / "seg_std.nii.gz").is_file()
    # masks back on the input's own grid: a subject stored in another axis order (PIL), read, segmented, and
    # written as volumes with its file's shape and affine; re-read like any input, they give the model-grid slices
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt
    import torch
    from medgen.common.data import fit_square, read_volume, to_slices
    subject = sorted((demo_root / "brain" / "val").iterdir())[0]
    turned = tmp_path / "turned" / subject.name
    turned.mkdir(parents=True)
    for f in subject.glob("*.nii.gz"):
        nib.save(nib.as_closest_canonical(nib.load(f)).as_reoriented(axcodes2ornt("PIL")), turned / f.name)
    out = tmp_path / "nii_turned"
    assert generate_main(["--image_model", str(tmp_path / "run"), "--images_from", str(turned.parent),
                          "--num_steps", "2", "--sampler", "ddim", "--output_dir", str(out), "--device", "cpu"]) == 0
    source = nib.load(turned / "bravo.nii.gz")
    for role in ("seg", "seg_mean", "seg_std"):
        vol = nib.load(out / "volumes" / subject.name / f"{role}.nii.gz")
        assert vol.shape == source.shape and np.allclose(vol.affine, source.affine)
    back = to_slices(read_volume(out / "volumes" / subject.name / "seg.nii.gz")[0])
    for r in csv.DictReader(open(out / "manifest.csv")):
        k = int(r["source"].rsplit("#slice", 1)[1])
        model_grid = to_slices(read_volume(out / r["files"].split(";")[0])[0])
        again = fit_square(torch.from_numpy(back[k][None, None]).float(), 32, None, "nearest")[0].numpy()
        assert np.array_equal(again, model_grid)
    with pytest.raises(UserError, match="does not segment images"):
        generate_main(["--image_model", str(tiny_models["bravo"]), "--images_from", str(demo_root / "brain"),
                       "--output_dir", str(tmp_path / "x"), "--device", "cpu"])


def test_images_from_flags_are_checked_first(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="--ensemble must be at least 1"):
        generate_main(["--image_model", "nowhere", "--images_from", str(tmp_path), "--ensemble", "0",
                       "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="exists and is not a folder"):
        generate_main(["--image_model", "nowhere", "--images_from", str(tmp_path), "--output_dir", str(tmp_path / "f")])
