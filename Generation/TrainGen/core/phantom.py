"""The embedded demo dataset: procedural brain-like MRI phantoms and a small class-labelled image folder.

Brain phantoms (original layout, RAS, int16 images, uint8 masks):
  scalp fat, dark skull, CSF rim and ventricles, folded grey matter over white matter, all warped by a
  random smooth deformation; 0-3 tumours per subject with a necrotic core and an enhancing rim (bright on
  T1-gd, invisible on T1-pre), surrounded by edema that is bright on the FLAIR-like `bravo` sequence.
  seg.nii.gz is a BraTS 2021 label map: 1 the necrotic core (NCR), 2 the edema (ED), 4 the enhancing rim (ET).
  Read as binary (data.labels binary, the original layout), the mask is the tumour itself, core + rim: the
  masks every demo figure was made with; data.labels brats2021 reads the three labels.
Everything is a pure function of (seed, subject index), so the dataset is identical on every machine.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medgen.common.data import MASK_ROLE
from medgen.common.outputs import MARK, check_owned

DEMO_VERSION = 3          # 3: seg.nii.gz holds the BraTS 2021 labels (binary reading unchanged)
SEQUENCES = ("t1_pre", "t1_gd", "bravo")
# tissue -> (T1-pre, T1-gd, bravo) intensity in [0, 1]
TISSUE = {
    "scalp": (0.90, 0.90, 0.70), "skull": (0.08, 0.08, 0.08), "csf": (0.20, 0.20, 0.12),
    "gm": (0.55, 0.57, 0.62), "wm": (0.78, 0.80, 0.46), "edema": (0.45, 0.46, 0.95),
    "necrosis": (0.28, 0.28, 0.55), "rim": (0.45, 1.00, 0.80),
}


def _smooth_field(rng, grid, n_terms=4, freq=3.0):
    """Sum of random low-frequency sinusoids on a coordinate grid: a smooth random field in about [-1, 1]."""
    out = np.zeros(grid[0].shape, np.float32)
    for _ in range(n_terms):
        w = rng.normal(0, freq, 3)
        out += np.sin(w[0] * grid[0] + w[1] * grid[1] + w[2] * grid[2] + rng.uniform(0, 2 * np.pi))
    return out / n_terms


def _tumours(rng, grid, brain, n):
    """Return (mask, necrosis, rim, edema) boolean volumes for n irregular tumours inside the brain."""
    shape = grid[0].shape
    mask, necrosis, edema = (np.zeros(shape, bool) for _ in range(3))
    candidates = np.argwhere(brain)
    for _ in range(n):
        centre = np.array([g[tuple(candidates[rng.integers(len(candidates))])] for g in grid])
        radius = rng.uniform(0.10, 0.22)
        lumps = 1 + 0.18 * _smooth_field(rng, grid, 3, 6.0)
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) / (radius * lumps)
        mask |= (dist < 1.0) & brain
        necrosis |= (dist < rng.uniform(0.35, 0.55)) & brain
        edema |= (dist < rng.uniform(1.6, 2.2)) & brain
    rim = mask & ~necrosis
    return mask, necrosis & mask, rim, edema & ~mask


BRATS_LABELS = {"necrosis": 1, "edema": 2, "rim": 4}   # the BraTS 2021 ids of NCR, ED and ET


def make_subject(seed: int, index: int, shape=(64, 64, 48)) -> dict[str, np.ndarray]:
    """One phantom: {'t1_pre','t1_gd','bravo': float32 [0,1] volumes, 'seg': uint8 label map (BRATS_LABELS)},
    RAS voxel order."""
    rng = np.random.default_rng([seed, index])
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    grid = np.meshgrid(*axes, indexing="ij")
    warped = [g + 0.06 * _smooth_field(rng, grid) for g in grid]
    radii = np.array([0.78, 0.92, 0.95]) * rng.uniform(0.93, 1.05, 3)
    r = np.sqrt(sum((w / a) ** 2 for w, a in zip(warped, radii)))
    folds = 0.04 * np.sin(18 * np.arctan2(warped[1], warped[0]) + 9 * warped[2])
    code = {name: k + 1 for k, name in enumerate(TISSUE)}          # 0: outside the head
    labels = np.zeros(shape, np.uint8)
    labels[r <= 1.0] = code["scalp"]
    labels[r <= 0.93] = code["skull"]
    labels[r <= 0.87] = code["csf"]
    labels[r <= 0.83] = code["gm"]
    labels[r <= 0.70 + folds] = code["wm"]
    ventricles = sum(((w - o) / a) ** 2 for w, o, a in zip(warped, (0.12, 0.05, 0.1), (0.08, 0.25, 0.15))) < 1
    ventricles |= sum(((w - o) / a) ** 2 for w, o, a in zip(warped, (-0.12, 0.05, 0.1), (0.08, 0.25, 0.15))) < 1
    labels[ventricles & (r <= 0.7)] = code["csf"]
    brain = np.isin(labels, [code["gm"], code["wm"]]) & (r <= 0.78)
    n_tumours = int(rng.choice(4, p=[0.1, 0.45, 0.3, 0.15]))  # 0-3 tumours; a few healthy subjects
    mask, necrosis, rim, edema = _tumours(rng, grid, brain, n_tumours)
    labels[edema] = code["edema"]
    labels[necrosis] = code["necrosis"]
    labels[rim] = code["rim"]

    bias = 1 + 0.08 * _smooth_field(rng, grid, 2, 1.5)
    out = {}
    for k, name in enumerate(SEQUENCES):
        vol = np.array([0.0] + [values[k] for values in TISSUE.values()], np.float32)[labels]
        vol = gaussian_filter(vol, 0.6) * bias
        noise = rng.normal(0, 0.02, (2,) + shape)
        out[name] = np.clip(np.sqrt((vol + noise[0]) ** 2 + noise[1] ** 2), 0, 1).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    for name, region in (("edema", edema), ("necrosis", necrosis), ("rim", rim)):
        seg[region] = BRATS_LABELS[name]
    out["seg"] = seg
    return out


def _affine(shape, fov=(240.0, 240.0, 144.0)):
    spacing = [f / s for f, s in zip(fov, shape)]
    affine = np.diag(spacing + [1.0])
    affine[:3, 3] = [-f / 2 for f in fov]
    return affine


def write_subject(folder: Path, volumes: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    affine = _affine(volumes["seg"].shape)
    for name, vol in volumes.items():
        data = vol if name == MASK_ROLE else np.round(vol * 1000).astype(np.int16)
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, folder / f"{name}.nii.gz")


def make_brain_dataset(root: Path, n_subjects=40, shape=(64, 64, 48), val_fraction=0.2, seed=0, n_test=0) -> None:
    """n_subjects phantoms in train/ and val/ (val_fraction of them), and n_test more in test/."""
    n_val = max(1, round(n_subjects * val_fraction))
    for i in range(n_subjects + n_test):
        split = "test" if i >= n_subjects else "val" if i >= n_subjects - n_val else "train"
        write_subject(Path(root) / split / f"demo_{i:03d}", make_subject(seed, i, shape))


LESION_CLASSES = ("melanoma", "nevus", "vascular")


def make_lesion_image(seed: int, cls: int, index: int, size=48) -> np.ndarray:
    """A skin-lesion-like RGB image: round smooth nevus, irregular two-tone melanoma, or red vascular blob."""
    rng = np.random.default_rng([seed, 1000 + cls, index])
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    skin = np.array([0.85, 0.68, 0.58]) * rng.uniform(0.9, 1.05)
    img = np.ones((size, size, 3)) * skin
    cx, cy, rad = rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(0.3, 0.5)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = {0: 0.25, 1: 0.04, 2: 0.1}[cls] * np.sin(rng.integers(3, 8) * angle + rng.uniform(0, 6))
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / (rad * (1 + wobble))
    colour = {0: [0.25, 0.15, 0.12], 1: [0.45, 0.3, 0.2], 2: [0.7, 0.15, 0.2]}[cls]
    lesion = np.clip(1.5 - 1.5 * dist, 0, 1)[..., None]
    img = img * (1 - lesion) + np.array(colour) * lesion
    if cls == 0:  # darker eccentric second tone
        spot = np.clip(1 - np.sqrt((xx - cx - 0.15) ** 2 + (yy - cy) ** 2) / (rad * 0.5), 0, 1)[..., None]
        img = img * (1 - spot) + np.array([0.1, 0.05, 0.05]) * spot
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_lesion_dataset(root: Path, per_class=30, size=48, seed=0) -> None:
    for c, name in enumerate(LESION_CLASSES):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(make_lesion_image(seed, c, i, size)).save(folder / f"{name}_{i:03d}.png")


DEMO_TEST_SUBJECTS = 12   # a fixed test split: 12 phantoms of which 10 hold a tumour, the utility study's minimum


def ensure_demo_data(root: Path, n_subjects=40, shape=(64, 64, 48), seed=0, n_test=DEMO_TEST_SUBJECTS) -> Path:
    """Build <root>/brain (train/val of n_subjects, and n_test test subjects) and <root>/lesions once;
    concurrent callers (DDP ranks) never see a partial set. A root that holds anything but an earlier demo set
    is refused (common/outputs.py), so rebuilding with other parameters replaces only medgen's own files."""
    root = Path(root)
    check_owned(root, "demo", "--out", own=("demo.json",))
    params = {"version": DEMO_VERSION, "n_subjects": n_subjects, "shape": list(shape), "seed": seed,
              "n_test": n_test}
    stamp = root / "demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return root
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_brain_dataset(tmp / "brain", n_subjects, shape, seed=seed, n_test=n_test)
    make_lesion_dataset(tmp / "lesions", seed=seed)
    (tmp / "demo.json").write_text(json.dumps(params))
    (tmp / MARK).write_text(json.dumps({"kind": "demo"}))
    if stamp.is_file() and json.loads(stamp.read_text()) == params:  # another process finished first
        shutil.rmtree(tmp)
        return root
    if root.exists():
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:  # lost a race against another process: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return root
