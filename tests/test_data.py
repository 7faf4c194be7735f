import numpy as np
import pytest
import torch
from PIL import Image

from medgen.common import data as nifti
from medgen.Generation.TrainGen.core.config import build_config
from medgen.common.dataset import load_split
from medgen.common.errors import UserError
from tests.helpers_nifti import mask_volume, pattern_volume, save

# role -> pattern written; read back, channel c of the output must show this pattern
PATTERNS = {"t1_pre": "left", "t1_gd": "anterior", "bravo": "ring", "t2": "all"}
NAMES = {
    "original": {"seg": "seg", "bravo": "bravo", "t1_pre": "t1_pre", "t1_gd": "t1_gd"},
    "brats2021": {"seg": "{s}_seg", "t1_pre": "{s}_t1", "t1_gd": "{s}_t1ce", "t2": "{s}_t2", "bravo": "{s}_flair"},
    "brats2023": {"seg": "{s}-seg", "t1_pre": "{s}-t1n", "t1_gd": "{s}-t1c", "t2": "{s}-t2w", "bravo": "{s}-t2f"},
}


def make_dataset(root, layout, n=3, labels=(1,)):
    for i in range(n):
        subject = f"S{i}"
        for role, name in NAMES[layout].items():
            vol = mask_volume(labels=labels) if role == "seg" else pattern_volume(PATTERNS[role])
            save(root / "train" / subject / (name.format(s=subject) + ".nii.gz"), vol)
    return root


def cfg_for(layout, **data):
    return build_config({"data": {"layout": layout, "image_size": 16, "cache": False, **data}})


def check_pattern(channel: torch.Tensor, kind: str):
    """channel: (H, W) in display orientation (anterior at the top, left on the left)."""
    h, w = channel.shape
    if kind == "left":
        assert channel[:, : w // 2 - 1].mean() > 0.9 and channel[:, w // 2 + 1:].max() < 0.1
    elif kind == "anterior":
        assert channel[: h // 2 - 1].mean() > 0.9 and channel[h // 2 + 1:].max() < 0.1


@pytest.mark.parametrize("layout", list(NAMES))
@pytest.mark.parametrize("roles", [["t1_pre", "t1_gd", "seg"], ["t1_gd", "t1_pre", "seg"], ["bravo", "seg"]])
def test_layout_presets_shapes_ranges_channel_order(tmp_path, layout, roles):
    labels = {"original": (1,), "brats2021": (1, 2, 4), "brats2023": (1, 2, 3)}[layout]
    root = make_dataset(tmp_path, layout, labels=labels)
    data = load_split(cfg_for(layout).data, root, "train", roles, None)
    image_roles = [r for r in roles if r != "seg"]
    assert data.images.shape == (3 * 8, len(image_roles), 16, 16) and data.images.dtype == torch.float16
    assert data.masks.shape == (24, 1, 16, 16) and set(data.masks.unique().tolist()) == {0, 1}
    assert 0 <= data.images.min() and data.images.max() <= 1
    assert data.channels == image_roles
    for c, role in enumerate(image_roles):
        check_pattern(data.images[0, c].float(), PATTERNS[role])


def test_mask_classes_keep_label_ids(tmp_path):
    root = make_dataset(tmp_path, "brats2021", labels=(1, 2, 4))
    data = load_split(cfg_for("brats2021", mask_mode="classes", image_size=24).data, root, "train", ["seg"], None)
    assert set(data.masks.unique().tolist()) == {0, 1, 2, 4}


def test_custom_layout(tmp_path):
    for i in range(2):
        save(tmp_path / f"p{i}" / "img_flair.nii", pattern_volume("ring"))
        save(tmp_path / f"p{i}" / "label.nii.gz", mask_volume())
    cfg = cfg_for("custom", modalities={"bravo": "*_flair", "seg": "label"}, val_fraction=0.5)
    train = load_split(cfg.data, tmp_path, "train", ["bravo", "seg"], None)
    val = load_split(cfg.data, tmp_path, "val", ["bravo", "seg"], None)
    assert len(train) == len(val) == 8 and train.sources[0] != val.sources[0]


def test_flat_split_is_seeded_and_disjoint(tmp_path):
    for i in range(10):
        save(tmp_path / f"s{i}" / "seg.nii.gz", mask_volume())
    lay = nifti.LAYOUTS["original"]
    a = nifti.find_splits(tmp_path, lay, 0.3, 1)
    assert a == nifti.find_splits(tmp_path, lay, 0.3, 1)
    assert len(a["val"]) == 3 and not set(a["val"]) & set(a["train"])
    assert a != nifti.find_splits(tmp_path, lay, 0.3, 2)


def test_positive_only_and_resize(tmp_path):
    root = make_dataset(tmp_path, "original", n=1)
    cfg = cfg_for("original", positive_only=True, image_size=48)
    data = load_split(cfg.data, root, "train", ["bravo", "seg"], None)
    assert data.slice_index == [2, 3, 4, 5]  # the mask occupies z = 2..5
    assert data.images.shape[-1] == 48 and all(m.any() for m in data.masks)


def test_slices_round_trip_and_reorientation(tmp_path):
    vol = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    assert np.array_equal(nifti.from_slices(nifti.to_slices(vol)), vol)
    # the same anatomy stored LPS (x and y flipped, affine says so) reads back identical after reorientation
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    save(tmp_path / "ras.nii.gz", vol)
    save(tmp_path / "lps.nii.gz", vol[::-1, ::-1].copy(), lps_affine)
    a, _, _ = nifti.read_volume(tmp_path / "ras.nii.gz")
    b, _, _ = nifti.read_volume(tmp_path / "lps.nii.gz")
    assert np.array_equal(a, b)


def test_2d_nifti_is_a_one_slice_volume(tmp_path):
    img = np.random.default_rng(1).random((16, 16)).astype(np.float32) + 0.1
    seg = np.zeros((16, 16), np.uint8)
    seg[4:8, 4:8] = 1
    save(tmp_path / "train" / "gen_0" / "bravo.nii.gz", nifti.from_slices(img[None]))
    save(tmp_path / "train" / "gen_0" / "seg.nii.gz", nifti.from_slices(seg[None]))
    data = load_split(cfg_for("original", norm_percentiles=[0, 100]).data, tmp_path, "train", ["bravo", "seg"], None)
    assert len(data) == 1 and torch.equal(data.masks[0, 0], torch.from_numpy(seg))
    expected = (img - img.min()) / (img.max() - img.min())
    assert torch.allclose(data.images[0, 0].float(), torch.from_numpy(expected), atol=2e-3)


def test_normalise_maps_percentiles_to_unit_range():
    vol = np.concatenate([np.zeros(100), np.linspace(1, 100, 1000)]).astype(np.float32)
    out = nifti.normalise(vol, (0, 100))
    assert out.min() == 0 and out.max() == 1 and out[:100].max() == 0


def write_png(path, mode, size=(20, 12), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 30, 200)).save(path)


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_image_folder_channels_and_class_ids(tmp_path, mode, channels):
    for cls in ("zeta", "alpha", "mid"):
        for i in range(4):
            write_png(tmp_path / cls / f"{i}.png", mode)
    cfg = build_config({"mode": {"name": "class"}, "data": {"image_size": 8, "cache": False, "val_fraction": 0.25}})
    data = load_split(cfg.data, tmp_path, "train", ["image"], None, kind="images")
    assert data.class_names == ["alpha", "mid", "zeta"]
    assert data.images.shape == (9, channels, 8, 8)
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all("/" + data.class_names[lab] + "/" in src for lab, src in zip(data.labels.tolist(), data.sources))
    if channels == 3:
        assert torch.allclose(data.images[0, :, 0, 0].float(), torch.tensor([128, 30, 200]) / 255, atol=2e-3)


def test_image_folder_labels_csv(tmp_path):
    for i in range(4):
        write_png(tmp_path / "flat" / f"{i}.png", "L")
    (tmp_path / "labels.csv").write_text("filename,label\n0.png,b\n1.png,a\n2.png,b\n3.png,a\n")
    cfg = build_config({"data": {"image_size": 8, "cache": False, "val_fraction": 0.0,
                                 "labels_csv": str(tmp_path / "labels.csv")}})
    data = load_split(cfg.data, tmp_path / "flat", "train", ["image"], None, kind="images")
    truth = {"0.png": 1, "1.png": 0, "2.png": 1, "3.png": 0}
    assert data.class_names == ["a", "b"] and len(data) == 4
    assert all(truth[src.rsplit("/", 1)[1]] == lab for src, lab in zip(data.sources, data.labels.tolist()))


def test_missing_folder_and_empty_folder(tmp_path):
    cfg = cfg_for("original")
    with pytest.raises(UserError, match="does not exist"):
        load_split(cfg.data, tmp_path / "nope", "train", ["seg"], None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no subject folders found"):
        load_split(cfg.data, tmp_path / "empty", "train", ["seg"], None)


@pytest.mark.parametrize("crop", [None, 24, 64])
def test_unfit_square_undoes_fit_square(crop):
    """At the size where no resize happens, unfit_square(fit_square(m)) is m inside the crop and 0 outside."""
    from medgen.common.data import fit_square, unfit_square
    m = (torch.rand(1, 1, 40, 28, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    ch, cw = (40, 28) if crop is None else (min(40, crop), min(28, crop))
    fitted = fit_square(m, max(ch, cw), crop, "nearest")
    back = unfit_square(fitted[0], (40, 28), "nearest", crop)
    top, left = (40 - ch) // 2, (28 - cw) // 2
    want = torch.zeros_like(m[0])
    want[:, top:top + ch, left:left + cw] = m[0, :, top:top + ch, left:left + cw]
    assert torch.equal(back, want)
    resized = unfit_square(fit_square(m, 16, crop, "nearest")[0], (40, 28), "nearest", crop)
    assert resized.shape == (1, 40, 28) and set(resized.unique().tolist()) <= {0.0, 1.0}


def test_read_volume_gives_nibabels_canonical_affine(tmp_path):
    """Axes permuted and flipped on a non-cubic grid: the RAS array and affine equal nibabel's own."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt
    from medgen.common.data import oriented_like, ras_shape, read_volume
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    ras = nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0]) + np.array([[0, 0, 0, -4.0]] * 3 + [[0, 0, 0, 0]]))
    turned = ras.as_reoriented(axcodes2ornt("PIL"))
    nib.save(turned, tmp_path / "t.nii.gz")
    vol, affine, problem = read_volume(tmp_path / "t.nii.gz")
    canonical = nib.as_closest_canonical(turned)
    assert problem is None and np.array_equal(vol, canonical.get_fdata()) and np.allclose(affine, canonical.affine)
    assert ras_shape(turned.shape, turned.affine) == vol.shape
    assert np.array_equal(oriented_like(vol, turned.affine), np.asanyarray(turned.dataobj))
