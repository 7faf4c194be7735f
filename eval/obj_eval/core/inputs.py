"""Evaluation inputs: NIfTI datasets (every layout the training loaders read, sliced and normalised the same
way) and image folders, as tensors in [0, 1], with the keys that pair synthetic samples with real slices.

Pairing (for MAE, PSNR and the quality modes of LPIPS and MS-SSIM):
  * by conditioning mask: a generate.py manifest records, for --masks_from runs, the real slice each sample
    was conditioned on ('<subject folder>#slice<k>'), which is matched against the real set's slices;
  * else by sample id: the same subject folder name and slice index (or the same relative image path, so
    same-named files of two flat image folders pair up).
A flat folder of images (real/0001.png ...) is an unlabelled set.
Without a match these metrics report that no pairs exist; pairs are never invented.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import torch
from PIL import Image

from medgen.config.paths import PathConfig
from medgen.common import imagefolder
from medgen.common.data import DataConfig
from medgen.common.data import is_nifti_dataset, nifti_files, walk_files
from medgen.common.dataset import load_folder
from medgen.common.errors import UserError
from medgen.common.splits import KEYED_PREFIX, anonymous_key, check_scheme, legacy_anonymous_key


@dataclass
class EvalSet:
    root: Path
    kind: str                      # nifti | images
    images: torch.Tensor           # (N, C, H, W) float32 in [0, 1]; volumes (N, C, D, H, W)
    ids: list[str]                 # '<subject name>#slice<k>' or the relative image path
    paths: list[str]               # '<resolved subject folder>#slice<k>' or the resolved image file
    groups: list[str] = field(default_factory=list)   # conditioning of each item (diversity within a mask)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "EvalSet":
        index = list(index)
        pick = lambda xs: [xs[i] for i in index] if xs else xs  # noqa: E731
        return EvalSet(self.root, self.kind, self.images[index], pick(self.ids), pick(self.paths), pick(self.groups))


def existing_folder(root, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what} {root}: folder does not exist")
    return root


def is_flat_image_folder(root: Path) -> bool:
    """Images directly in root and no class sub-folder holding any (a generated class folder keeps its previews
    at the top beside the class folders: that is not a flat folder)."""
    subfolders = [d for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(imagefolder.images_in(root)) and not any(imagefolder.images_in(d) for d in subfolders)


def native_size(root: Path, what: str = "--synthetic-dir") -> int:
    """The in-plane size of a dataset's first image (the evaluation resolution when none is given): its first
    NIfTI file, or for an image folder the first image inside a class folder (previews at the top are not data)."""
    root = existing_folder(root, what)
    if is_nifti_dataset(root):
        sizes = [max(nib.load(str(p)).shape[:2]) for p in nifti_files(root)]
    else:
        files = imagefolder.images_in(root) if is_flat_image_folder(root) else \
            [p for p in walk_files(root) if p.parent != root and p.suffix.lower() in imagefolder.IMAGE_SUFFIXES]
        sizes = [max(Image.open(p).size) for p in files]
    if not sizes:
        raise UserError(f"{root}: no NIfTI or image files found")
    if len(set(sizes)) > 1:
        print(f"warning: {what} {root} holds images of several sizes ({', '.join(f'{s} px' for s in sorted(set(sizes)))}); "
              f"all are evaluated at {sizes[0]} px, the first file's (--image-size sets it)", file=sys.stderr)
    return sizes[0]


def native_volume_shape(root: Path, what: str = "--synthetic-dir") -> list[int]:
    """[H, W, D] of a NIfTI dataset's first volume in the loaders' slice order (data.volume_shape's order)."""
    root = existing_folder(root, what)
    files = nifti_files(root)
    if not files:
        raise UserError(f"{what} {root}: volumes are evaluated from NIfTI files and this folder holds none")
    x, y, *z = nib.load(str(files[0])).shape
    if not z or z[0] == 1:
        raise UserError(f"{what} {files[0]}: a 2D slice; --spatial-dims 3 evaluates 3D volumes")
    return [int(y), int(x), int(z[0])]


def manifest_conditions(root: Path) -> dict[str, str]:
    """{sample folder name: the conditioning it was generated with} from a generate.py manifest.csv."""
    path = Path(root) / "manifest.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["files"].split("/")[0]: row.get("condition", "") for row in csv.DictReader(f) if row.get("files")}


def load_set(root, image_type: str = "bravo", size: int | None = None, positive_only: bool = False,
             layout: str = "original", crop_size: int | None = None, what: str = "--real-dir",
             skip_bad: bool = False, compute: str = "auto", volume_shape: list[int] | None = None) -> EvalSet:
    """A whole folder (every split) as an EvalSet at `size` px; with volume_shape [H, W, D] whole volumes
    (N, 1, D, H, W) on that grid (the training loaders' crop/pad/downsample)."""
    root = existing_folder(root, what)
    if volume_shape is None:
        size = size or native_size(root, what)
    elif not is_nifti_dataset(root):
        raise UserError(f"{what} {root}: --spatial-dims 3 evaluates NIfTI volumes; this is an image folder")
    if not is_nifti_dataset(root):
        flat = is_flat_image_folder(root)
        if flat:   # unlabelled: no classes, no conditioning groups; same file names pair up
            items, classes = [(p, "") for p in imagefolder.images_in(root)], [""]
        else:
            splits, classes, _ = imagefolder.find_image_splits(root, None, 0.0, 0)
            items = [it for s in splits.values() for it in s]
        tensors, bad = imagefolder.load_images(items, classes, size)
        if bad:
            raise UserError(f"{what} {root}: {bad[0]}")
        files = [Path(f) for f in tensors["files"]]
        ids = [str(f.resolve().relative_to(root.resolve())) for f in files]
        return EvalSet(root, "images", tensors["images"].float(), ids, [str(f.resolve()) for f in files],
                       [] if flat else [classes[i] for i in tensors["labels"].tolist()])
    cfg = DataConfig(data_dir=str(root), image_size=size or 128, layout=layout, crop_size=crop_size,
                     positive_only=positive_only, val_fraction=0.0, format="nifti", skip_bad=skip_bad,
                     spatial_dims=3 if volume_shape else 2, volume_shape=list(volume_shape or [64, 64, 48]))
    cache = PathConfig.from_compute(compute).slice_cache
    data = load_folder(cfg, root, [image_type, "seg"] if positive_only else [image_type], cache)
    if len(data) == 0:
        raise UserError(f"{what} {root}: no slices to evaluate")
    ids = [f"{Path(src).name}#slice{k}" if k >= 0 else Path(src).name   # a volume is its subject
           for src, k in zip(data.sources, data.slice_index)]
    paths = data.slice_keys()
    conditions = manifest_conditions(root)
    groups = [conditions.get(i.split("#")[0], p) or p for i, p in zip(ids, paths)]
    return EvalSet(root, "nifti", data.images[:, :1].float(), ids, paths, groups)


def anonymous_key_id(root: Path) -> str:
    """The site key id that generate.py recorded for the manifest's 'hmac:' names (generation.json)."""
    import json
    try:
        rec = json.loads((Path(root) / "generation.json").read_text())
    except (OSError, ValueError):
        rec = {}
    return rec.get("anonymous_key_id") or "unknown"


def pair(synthetic: EvalSet, real: EvalSet) -> tuple[list[int], list[int], str]:
    """(synthetic indices, real indices, how) of matched pairs; empty lists when nothing matches."""
    by_path = {p: i for i, p in enumerate(real.paths)}
    if any(g.startswith(KEYED_PREFIX) for g in synthetic.groups):  # generate.py --anonymize_sources
        check_scheme(anonymous_key_id(synthetic.root), f"{synthetic.root}: the manifest's anonymous source names")
        by_path.update({anonymous_key(p): i for i, p in enumerate(real.paths)})
    if any(g.startswith("sha256:") for g in synthetic.groups):     # a manifest from before keyed names
        by_path.update({legacy_anonymous_key(p): i for i, p in enumerate(real.paths)})
    s_idx, r_idx = [], []
    for i, g in enumerate(synthetic.groups):
        if g in by_path and g not in synthetic.paths:
            s_idx.append(i)
            r_idx.append(by_path[g])
    if s_idx:
        return s_idx, r_idx, "conditioning mask (generation manifest)"
    by_id = {k: i for i, k in enumerate(real.ids)}
    for i, k in enumerate(synthetic.ids):
        if k in by_id:
            s_idx.append(i)
            r_idx.append(by_id[k])
    return s_idx, r_idx, ("sample id" if s_idx else "none")


def parse_volume_shape(text: str | None, spatial_dims: int) -> list[int] | None:
    """--volume-shape '64,64,48' -> [64, 64, 48] (H, W, D); None stays None. Only with --spatial-dims 3."""
    if text is None:
        return None
    if spatial_dims != 3:
        raise UserError("--volume-shape needs --spatial-dims 3")
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) < 4:
        raise UserError(f"--volume-shape {text}: expected H,W,D, each at least 4 (e.g. 64,64,48)")
    return shape
