"""Image-folder datasets for the class-conditional mode: root/<class_name>/*.png|jpg (or a labels CSV).

Class ids follow the sorted class names. Grayscale stays one channel; if any image has colour, all are read
as RGB (alpha dropped). Images are centre-cropped to a square and resized (bilinear, antialiased) to
data.image_size, values in [0, 1]. Without train/ and val/ sub-folders, a per-class seeded split holds out
data.val_fraction of each class.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medgen.common.data import Problem, fit_square
from medgen.common.errors import UserError
from medgen.common.names import check_name, patient_of

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
MIN_SIDE = 8   # smaller images hold too little to resize from (data.image_size is at least 8 too)


def images_in(folder: Path) -> list[Path]:
    """The image files directly in folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# (image column, label column or None for one-hot columns) of the published label files, tried in order
CSV_LAYOUTS = (("filename", "label"), ("id_code", "diagnosis"), ("image", None))  # ours, APTOS, ISIC


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    """[(line number, row)] of a CSV read as UTF-8 with or without a byte-order mark (as Excel saves it); bytes
    that are not UTF-8 are one error naming their line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8 "
                        "(Excel: CSV UTF-8)") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        rows.append((reader.line_num, row))
    return rows


def read_labels_csv(root: Path, path: Path, image_col: str | None = None, label_col: str | None = None):
    """[(file, class name)] from a labels CSV: one label column (filename,label; APTOS id_code,diagnosis) or
    one-hot columns (ISIC image,MEL,NV,...: the class is the column holding 1). Columns are found by the
    layouts above unless data.csv_image_column / data.csv_label_column name them. A name without a suffix
    (ISIC, APTOS) is looked up with each image suffix. A row listed twice is used once (with a warning); an
    image listed with two labels, a short row and a label that cannot be a folder name are refused by line."""
    if not path.is_file():
        raise UserError(f"data.labels_csv not found: {path}")
    rows = _csv_rows(path)
    header = list(rows[0][1]) if rows else []
    layouts = [(image_col, label_col)] if image_col else CSV_LAYOUTS
    found = next(((i, lab) for i, lab in layouts if i in header and (lab is None or lab in header)), None)
    if found is None:
        raise UserError(f"{path}: columns {', '.join(map(str, header)) or '(none)'} match no known layout "
                        "(filename,label; APTOS id_code,diagnosis; ISIC image + one-hot class columns); set "
                        "data.csv_image_column and data.csv_label_column")
    image_col, label_col = found
    classes = [c for c in header if c != image_col]
    seen: dict[str, tuple[str, int]] = {}
    items, problems = [], []
    for n, row in rows:
        if any(v is None for v in row.values()) or None in row:
            raise UserError(f"{path}: line {n} does not have the header's {len(header)} fields "
                            f"({', '.join(map(str, header))})")
        name = row[image_col].strip()
        if label_col is not None:
            label = row[label_col].strip()
        else:
            hot = [c for c in classes if _is_one(row[c])]
            if len(hot) != 1:
                problems.append(Problem(path, f"line {n}: {len(hot)} one-hot columns set for {name!r}"))
                continue
            label = hot[0]
        check_name(label, f"{path} line {n}")
        if name in seen:
            first, line = seen[name]
            if first != label:
                raise UserError(f"{path}: image {name!r} has label {first!r} on line {line} and {label!r} on line "
                                f"{n}; give each image one label")
            problems.append(Problem(path, f"line {n}: {name!r} is listed again (line {line}); used once",
                                    fatal=False))
            continue
        seen[name] = (label, n)
        items.append((_image_file(root, name), label))
    return items, problems


def _is_one(text: str) -> bool:
    try:
        return float(text) == 1.0
    except ValueError:
        return False


def _image_file(root: Path, name: str) -> Path:
    path = root / name
    if path.suffix.lower() in IMAGE_SUFFIXES or path.is_file():
        return path
    return next((path.with_name(path.name + s) for s in IMAGE_SUFFIXES if path.with_name(path.name + s).is_file()),
                path)


def list_items(root: Path, labels_csv: str | None, columns: tuple | None = None
               ) -> tuple[list[tuple[Path, str]], list[Problem]]:
    """[(file, class name)] from class folders or from a labels CSV (see read_labels_csv)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder does not exist")
    if labels_csv:
        return read_labels_csv(root, Path(labels_csv), *(columns or (None, None)))
    items, problems = [], []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):  # not .rows etc.
        files = images_in(folder)
        if not files:
            problems.append(Problem(folder, "empty class folder (no .png/.jpg images)"))
        items += [(f, check_name(folder.name, f"class folder {folder}")) for f in files]
    if not items:
        raise UserError(f"{root}: no images found (expected {root}/<class_name>/*.png or *.jpg)")
    return items, problems


def find_image_splits(root: Path, labels_csv: str | None, val_fraction: float, seed: int,
                      columns: tuple | None = None, patient_pattern: str | None = None):
    """({split: [(file, class)]}, class names, problems). A flat folder is split per class by file, or with a
    patient pattern by patient (split_by_patient)."""
    root = Path(root)
    if (root / "train").is_dir() and not labels_csv:
        splits, problems = {}, []
        for s in ("train", "val", "test"):
            if (root / s).is_dir():
                splits[s], p = list_items(root / s, None)
                problems += p
    else:
        items, problems = list_items(root, labels_csv, columns)
        if patient_pattern is not None:
            splits = split_by_patient(items, [f for f, _ in items], patient_pattern, val_fraction, seed)
        else:
            splits = split_by_class(items, val_fraction, seed)
    classes = sorted({c for items in splits.values() for _, c in items})
    return splits, classes, problems


def split_by_class(items: list[tuple[Path, str]], val_fraction: float, seed: int) -> dict[str, list]:
    """{'train', 'val'}: val_fraction of each class's files held out, by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    splits = {"train": [], "val": []}
    for name in sorted({c for _, c in items}):
        members = [it for it in items if it[1] == name]
        n_val = int(round(len(members) * val_fraction)) if len(members) > 1 else 0
        order = rng.permutation(len(members))
        splits["val"] += [members[i] for i in sorted(order[:n_val])]
        splits["train"] += [members[i] for i in sorted(order[n_val:])]
    return splits


def split_by_patient(items: list, files: list[Path], pattern: str, val_fraction: float, seed: int
                     ) -> dict[str, list]:
    """{'train', 'val'}: the patients (patient_of each file) shuffled with the seed, val_fraction of them held
    out with every one of their images."""
    patients = [patient_of(f, pattern) for f in files]
    names = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = int(round(len(names) * val_fraction)) if len(names) > 1 else 0
    held = {names[i] for i in order[:n_val]}
    return {"train": [it for it, p in zip(items, patients) if p not in held],
            "val": [it for it, p in zip(items, patients) if p in held]}


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


def image_tensor(img: Image.Image, rgb: bool, size: int, mask: bool = False) -> torch.Tensor:
    """(C, size, size) in [0, 1]: centre-cropped to a square and resized (masks: {0, 1}, nearest)."""
    if mask:
        arr = (np.asarray(img.convert("L"), dtype=np.float32) > 0).astype(np.float32)
    else:
        arr = np.asarray(img.convert("RGB" if rgb else "F" if img.mode in ("I", "I;16", "F") else "L"),
                         dtype=np.float32)
        arr = arr / max(float(arr.max()), 1.0) if img.mode in ("I", "I;16", "F") else arr / 255.0
    t = torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)[None]
    return fit_square(t, size, min(t.shape[-2:]), "nearest" if mask else "bilinear").clamp_(0, 1)[0]


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
    tensors = [image_tensor(img, rgb, size) for img, _, _ in decoded]
    out = {"images": torch.stack(tensors) if tensors else torch.zeros(0, 3 if rgb else 1, size, size),
           "labels": torch.tensor([c for _, c, _ in decoded], dtype=torch.long),
           "files": [str(p) for _, _, p in decoded]}
    return out, problems


# ---------------------------------------------------------------- image + mask pairs (segment mode)
PAIR_DIRS = ("images", "masks")   # root/images/NAME.png with root/masks/NAME.png (any image suffix each)


def is_pair_folder(root: Path) -> bool:
    root = Path(root)
    return (root / "images").is_dir() or (root / "train" / "images").is_dir()


def pairs_in(folder: Path, need_masks: bool = True) -> tuple[list[tuple[Path, Path | None]], list[Problem]]:
    """[(image, its mask or None)] of folder/images and folder/masks, matched by file stem."""
    if not (folder / "images").is_dir():
        raise UserError(f"{folder}: no images/ folder (expected {folder}/images/*.png and {folder}/masks/*.png)")
    masks = {p.stem: p for p in images_in(folder / "masks")} if (folder / "masks").is_dir() else {}
    items, problems = [], []
    for image in images_in(folder / "images"):
        if image.stem not in masks and need_masks:
            problems.append(Problem(image, f"no mask masks/{image.stem}.png for this image"))
            continue
        items.append((image, masks.get(image.stem)))
    if not items and not problems:
        raise UserError(f"{folder / 'images'}: no images found")
    return items, problems


def find_pair_splits(root: Path, val_fraction: float, seed: int, patient_pattern: str | None = None):
    """({split: [(image, mask)]}, problems) from root/{train,val,test}/{images,masks}/ or a flat root/ split by
    a seeded shuffle (of patients, with a patient pattern: split_by_patient)."""
    root = Path(root)
    if (root / "train" / "images").is_dir():
        splits, problems = {}, []
        for s in ("train", "val", "test"):
            if (root / s / "images").is_dir():
                splits[s], p = pairs_in(root / s)
                problems += p
        return splits, problems
    items, problems = pairs_in(root)
    if patient_pattern is not None:
        return split_by_patient(items, [image for image, _ in items], patient_pattern, val_fraction, seed), problems
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(round(len(items) * val_fraction)) if len(items) > 1 else 0
    return {"train": [items[i] for i in sorted(order[n_val:])], "val": [items[i] for i in sorted(order[:n_val])]}, \
        problems


def load_pairs(items: list[tuple[Path, Path | None]], size: int) -> tuple[dict, list[Problem]]:
    """{'images': (N, C, H, W), 'masks': (N, 1, H, W) or None when no item has one, 'files'}; an image and its
    mask must have the same size."""
    decoded, problems = [], []
    for image_path, mask_path in items:
        img, problem = read_image(image_path)
        mask = None
        if problem is None and mask_path is not None:
            mask, problem = read_image(mask_path)
            if problem is None and mask.size != img.size:
                problem = Problem(mask_path, f"mask is {mask.size[0]}x{mask.size[1]} px, its image "
                                             f"{img.size[0]}x{img.size[1]} px")
        if problem:
            problems.append(problem)
        else:
            decoded.append((img, mask, image_path))
    rgb = any(img.mode not in GREY_MODES for img, _, _ in decoded)
    images = [image_tensor(img, rgb, size) for img, _, _ in decoded]
    has_masks = bool(decoded) and all(m is not None for _, m, _ in decoded)
    masks = [image_tensor(m, False, size, mask=True) for _, m, _ in decoded] if has_masks else None
    return {"images": torch.stack(images) if images else torch.zeros(0, 3 if rgb else 1, size, size),
            "masks": (torch.stack(masks).to(torch.uint8) if masks else None),
            "files": [str(p) for _, _, p in decoded],
            "sizes": [(img.height, img.width) for img, _, _ in decoded]}, problems
