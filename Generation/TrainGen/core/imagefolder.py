"""Image-folder datasets for the class-conditional mode: root/<class_name>/*.png|jpg (or a labels CSV).

Class ids follow the sorted class names. Grayscale stays one channel; if any image has colour, all are read
as RGB (alpha dropped). Images are centre-cropped to a square and resized (bilinear, antialiased) to
data.image_size, values in [0, 1]. Without train/ and val/ sub-folders, a per-class seeded split holds out
data.val_fraction of each class.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from Generation.TrainGen.core.data import Problem, fit_square
from Generation.TrainGen.core.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
MIN_SIDE = 8   # smaller images hold too little to resize from (data.image_size is at least 8 too)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_items(root: Path, labels_csv: str | None) -> tuple[list[tuple[Path, str]], list[Problem]]:
    """[(file, class name)] from class folders or from a CSV with columns filename,label."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder does not exist")
    if labels_csv:
        csv_path = Path(labels_csv)
        if not csv_path.is_file():
            raise UserError(f"data.labels_csv not found: {csv_path}")
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"filename", "label"} <= set(rows[0]):
            raise UserError(f"{csv_path}: expected a header with columns filename,label")
        return [(root / r["filename"], r["label"]) for r in rows], []
    items, problems = [], []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):  # not .rows etc.
        files = _images_in(folder)
        if not files:
            problems.append(Problem(folder, "empty class folder (no .png/.jpg images)"))
        items += [(f, folder.name) for f in files]
    if not items:
        raise UserError(f"{root}: no images found (expected {root}/<class_name>/*.png or *.jpg)")
    return items, problems


def find_image_splits(root: Path, labels_csv: str | None, val_fraction: float, seed: int):
    """({split: [(file, class)]}, class names, problems)."""
    root = Path(root)
    if (root / "train").is_dir() and not labels_csv:
        splits, problems = {}, []
        for s in ("train", "val", "test"):
            if (root / s).is_dir():
                splits[s], p = list_items(root / s, None)
                problems += p
    else:
        items, problems = list_items(root, labels_csv)
        rng = np.random.default_rng(seed)
        splits = {"train": [], "val": []}
        for name in sorted({c for _, c in items}):
            members = [it for it in items if it[1] == name]
            n_val = int(round(len(members) * val_fraction)) if len(members) > 1 else 0
            order = rng.permutation(len(members))
            splits["val"] += [members[i] for i in sorted(order[:n_val])]
            splits["train"] += [members[i] for i in sorted(order[n_val:])]
    classes = sorted({c for items in splits.values() for _, c in items})
    return splits, classes, problems


def read_image(path: Path) -> tuple[Image.Image | None, Problem | None]:
    try:
        with Image.open(path) as img:
            img.load()  # full decode: a truncated file fails here, not in a worker hours later
            if min(img.size) < MIN_SIDE:
                return None, Problem(path, f"image is {img.size[0]}x{img.size[1]} px: too small (at least "
                                           f"{MIN_SIDE} px a side)")
            return img.copy(), None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        return None, Problem(path, f"unreadable image ({str(err).splitlines()[0] if str(err) else 'corrupt'})")


def load_images(items: list[tuple[Path, str]], classes: list[str], size: int) -> tuple[dict, list[Problem]]:
    """Decode, check and preprocess a list of images into {'images': (N,C,H,W) float32, 'labels': (N,)}."""
    decoded, problems = [], []
    for path, name in items:
        img, problem = read_image(path)
        if problem:
            problems.append(problem)
        else:
            decoded.append((img, classes.index(name), path))
    rgb = any(img.mode not in GREY_MODES for img, _, _ in decoded)
    tensors = []
    for img, _, path in decoded:
        arr = np.asarray(img.convert("RGB" if rgb else "F" if img.mode in ("I", "I;16", "F") else "L"),
                         dtype=np.float32)
        if img.mode in ("I", "I;16", "F"):
            arr = arr / max(float(arr.max()), 1.0)
        else:
            arr = arr / 255.0
        t = torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)[None]
        tensors.append(fit_square(t, size, min(t.shape[-2:]), "bilinear").clamp_(0, 1)[0])
    out = {"images": torch.stack(tensors) if tensors else torch.zeros(0, 3 if rgb else 1, size, size),
           "labels": torch.tensor([c for _, c, _ in decoded], dtype=torch.long),
           "files": [str(p) for _, _, p in decoded]}
    return out, problems
