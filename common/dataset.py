"""In-memory slice datasets with an on-disk cache.

A split is preprocessed once into tensors (images float16 in [0,1], masks uint8, labels int64) and saved as
<cache>/<root-hash>-<split>-<key>.pt. The key hashes every source file (path, size, mtime) and every
preprocessing parameter, so editing a file or a parameter rebuilds the cache and nothing else does.
The scan that builds it reads every array in full, so a bad file is reported before training starts.
"""
from __future__ import annotations

import hashlib
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medgen.common import data as nifti
from medgen.common import imagefolder
from medgen.common.errors import UserError
from medgen.common.fileio import atomic_write

CACHE_VERSION = 1


@dataclass
class SliceData:
    images: torch.Tensor | None           # (N, C, H, W) float16 in [0, 1]
    masks: torch.Tensor | None            # (N, 1, H, W) uint8
    labels: torch.Tensor | None           # (N,) int64 class ids
    sources: list[str]                    # subject folder or image file of each slice
    slice_index: list[int]                # axial index in the canonical volume (-1 for 2D images)
    channels: list[str]                   # names of the image channels, in order
    class_names: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # skipped subjects and warnings, one line each
    spacing: torch.Tensor | None = None   # volumes: (N, 3) voxel spacing in mm of each grid, (D, H, W) order

    @property
    def spatial_dims(self) -> int:
        ref = self.images if self.images is not None else self.masks
        return 2 if ref is None else ref.dim() - 2

    def __len__(self) -> int:
        ref = self.images if self.images is not None else self.masks
        return 0 if ref is None else len(ref)

    def slice_keys(self) -> list[str]:
        """'<resolved subject folder>#slice<k>' per slice: how generation manifests and evaluation name a slice."""
        return [f"{Path(src).resolve()}#slice{k}" for src, k in zip(self.sources, self.slice_index)]

    @property
    def device(self) -> torch.device:
        ref = self.images if self.images is not None else self.masks
        return ref.device if ref is not None else torch.device("cpu")

    def to(self, device) -> "SliceData":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SliceData(move(self.images), move(self.masks), move(self.labels), self.sources, self.slice_index,
                         self.channels, self.class_names, self.problems, self.spacing)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather one batch as float32 (masks as float {0,1} or label ids) on the data's device."""
        out = {}
        if self.images is not None:
            out["images"] = self.images[index].float()
        if self.masks is not None:
            out["masks"] = self.masks[index].float()
        if self.labels is not None:
            out["labels"] = self.labels[index]
        return out

    def batch_indices(self, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """(num_batches, batch_size) indices of one epoch. Every rank draws the same permutation from the
        shared seed and takes its own stride; the tail that does not fill a batch on every rank is dropped
        (fixed shapes for torch.compile, equal step counts for DDP)."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        per_rank = len(self) // world
        mine = perm[rank::world][:per_rank]
        n = len(mine) // batch_size
        return mine[: n * batch_size].view(n, batch_size)

    def state(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _fingerprint(paths) -> list:
    out = []
    for p in sorted(set(map(Path, paths))):
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _cache_file(cache_dir: Path, root: Path, split: str, key_data: dict) -> Path:
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root_tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{root_tag}-{split}-{key}.pt"


def csv_columns(data_cfg) -> tuple[str | None, str | None]:
    return data_cfg.csv_image_column, data_cfg.csv_label_column


def read_cache(path: Path) -> SliceData | None:
    """A cached split, or None when the file cannot be read back (then it is rebuilt; said in one line)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return SliceData(**stored)
    except Exception as err:  # noqa: BLE001 - a damaged cache is a cache miss, whatever the damage
        print(f"warning: {path}: unreadable slice cache ({type(err).__name__}); rebuilding it", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None


def _process_subject(args):
    subject, layout, roles, pre = args
    affines: dict = {}
    vols, problems = nifti.load_subject(subject, layout, roles, affines)
    if not vols:
        return None, problems
    if pre.volume_shape is not None and min(v.shape[2] for v in vols.values()) == 1:
        return None, problems + [nifti.Problem(subject, "2D slices, not volumes: data.spatial_dims 3 "
                                                        "(--spatial_dims 3) needs 3D NIfTI volumes")]
    return pre(vols, nifti.voxel_spacing(next(iter(affines.values())))), problems


def _build_nifti(subjects, layout, roles, pre, workers, desc) -> tuple[SliceData, list[nifti.Problem]]:
    jobs = [(s, layout, roles, pre) for s in subjects]
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(_process_subject, jobs), total=len(jobs), desc=desc, leave=False))
    else:
        results = [_process_subject(j) for j in tqdm(jobs, desc=desc, leave=False, disable=len(jobs) < 20)]
    parts, problems, sources, index = [], [], [], []
    for subject, (tensors, probs) in zip(subjects, results):
        problems += probs
        if tensors is not None:
            parts.append(tensors)
            sources += [str(subject)] * len(tensors["index"])
            index += tensors["index"].tolist()
    cat = lambda k: torch.cat([p[k] for p in parts]) if parts and k in parts[0] else None  # noqa: E731
    images = cat("images")
    shape = pre.volume_shape or (pre.image_size, pre.image_size)
    if images is None and pre.image_roles:
        images = torch.zeros(0, len(pre.image_roles), *shape)
    masks = cat("masks")
    if masks is None and pre.with_mask:
        masks = torch.zeros(0, 1, *shape, dtype=torch.uint8)
    data = SliceData(images.half() if images is not None else None, masks, None, sources, index, pre.image_roles,
                     spacing=cat("spacing"))
    return data, problems


def load_split(data_cfg, root: Path, split: str, roles: list[str], cache_dir: Path | None,
               kind: str = "nifti", workers: int = 0) -> SliceData:
    """Preprocessed tensors of one split, from the cache when its key matches, else built and cached."""
    return scan_split(data_cfg, root, split, roles, cache_dir, kind, workers, raise_fatal=True)[0]


def load_folder(data_cfg, root: Path, roles: list[str], cache_dir: Path | None) -> SliceData:
    """Every split of a NIfTI dataset folder, concatenated (generation conditions, evaluation sets)."""
    root = Path(root)
    splits = nifti.find_splits(root, nifti.layout_from_config(data_cfg), data_cfg.val_fraction, data_cfg.split_seed)
    parts = [load_split(data_cfg, root, split, roles, cache_dir) for split, subjects in splits.items() if subjects]
    cat = lambda k: torch.cat([getattr(p, k) for p in parts]) if getattr(parts[0], k) is not None else None  # noqa: E731
    return SliceData(cat("images"), cat("masks"), None, [s for p in parts for s in p.sources],
                     [k for p in parts for k in p.slice_index], parts[0].channels,
                     problems=[x for p in parts for x in p.problems], spacing=cat("spacing"))


def scan_split(data_cfg, root: Path, split: str, roles: list[str], cache_dir: Path | None,
               kind: str = "nifti", workers: int = 0, raise_fatal: bool = False):
    """Return (SliceData, problem lines, number of fatal problems) of a NIfTI dataset, a class image folder
    (kind 'images') or image + mask PNG folders (kind 'pairs'). A fatal problem without data.skip_bad raises
    UserError when raise_fatal, else it is returned (for --check_data) and nothing is cached."""
    root = Path(root)
    if kind != "nifti" and data_cfg.spatial_dims == 3:
        raise UserError(f"{root}: data.spatial_dims 3 (--spatial_dims 3) needs NIfTI volumes; this is a 2D "
                        f"image folder")
    if kind == "pairs":
        splits, folder_problems = imagefolder.find_pair_splits(root, data_cfg.val_fraction, data_cfg.split_seed,
                                                               data_cfg.patient_pattern)
        files = [f for pair in splits.get(split, []) for f in pair if f is not None]
        params = {"kind": "pairs", "size": data_cfg.image_size, "val": data_cfg.val_fraction,
                  "seed": data_cfg.split_seed, "patients": data_cfg.patient_pattern}
    elif kind == "images":
        splits, classes, folder_problems = imagefolder.find_image_splits(
            root, data_cfg.labels_csv, data_cfg.val_fraction, data_cfg.split_seed, csv_columns(data_cfg),
            data_cfg.patient_pattern)
        files = [f for f, _ in splits.get(split, [])]
        params = {"kind": "images", "size": data_cfg.image_size, "val": data_cfg.val_fraction,
                  "seed": data_cfg.split_seed, "csv": data_cfg.labels_csv, "classes": classes,
                  "csv_columns": csv_columns(data_cfg), "patients": data_cfg.patient_pattern}
    else:
        layout = nifti.layout_from_config(data_cfg)
        splits = nifti.find_splits(root, layout, data_cfg.val_fraction, data_cfg.split_seed)
        image_roles = [r for r in roles if r != "seg"]
        percentiles = None if nifti.is_generated(root) else tuple(data_cfg.norm_percentiles)
        label_maps = data_cfg.mask_mode == "classes" or data_cfg.labels != "binary"    # keep the label ids
        pre = nifti.Preprocess(data_cfg.image_size, data_cfg.crop_size, percentiles,
                               "classes" if label_maps else "binary", data_cfg.positive_only, image_roles,
                               "seg" in roles, data_cfg.shape if data_cfg.spatial_dims == 3 else None,
                               layout.tumour)
        subjects = splits.get(split, [])
        found = [nifti.subject_files(s, layout, roles) for s in subjects]
        files = [f for fs, _ in found for f in fs.values()]
        params = {"kind": "nifti", "layout": layout.patterns, "labels": layout.mask_labels, "roles": roles,
                  "pre": pre.__dict__, "subjects": [str(s) for s in subjects]}
    if split not in splits:
        raise UserError(f"{root}: no '{split}' split (found: {', '.join(splits)})")
    key = {"v": CACHE_VERSION, "split": split, "files": _fingerprint(files), "params": params,
           "skip_bad": data_cfg.skip_bad}
    path = _cache_file(cache_dir, root, split, key) if cache_dir is not None and data_cfg.cache else None
    if path is not None and path.is_file():
        cached = read_cache(path)
        if cached is not None:
            return cached, cached.problems, 0

    desc = f"scanning {split} ({len(files)} files)"
    if kind == "pairs":
        tensors, problems = imagefolder.load_pairs(splits[split], data_cfg.image_size)
        problems = (folder_problems if split == next(iter(splits)) else []) + problems
        data = SliceData(tensors["images"].half(), tensors["masks"], None, tensors["files"],
                         [-1] * len(tensors["files"]), ["rgb"] if tensors["images"].shape[1] == 3 else ["grey"])
    elif kind == "images":
        tensors, problems = imagefolder.load_images(splits[split], classes, data_cfg.image_size)
        problems = (folder_problems if split == next(iter(splits)) else []) + problems  # said once, not per split
        data = SliceData(tensors["images"].half(), None, tensors["labels"], tensors["files"],
                         [-1] * len(tensors["files"]), ["rgb"] if tensors["images"].shape[1] == 3 else ["grey"],
                         classes)
    else:
        data, problems = _build_nifti(subjects, layout, roles, pre, workers, desc)
    fatal = [p for p in problems if p.fatal]
    if fatal and not data_cfg.skip_bad:
        lines = "\n  ".join(map(str, fatal))
        if raise_fatal:
            raise UserError(f"{len(fatal)} problem(s) in {root} (use --skip_bad to leave those subjects out):"
                            f"\n  {lines}")
        return data, [str(p) for p in problems], len(fatal)
    data.problems = [("skipped: " if p.fatal else "warning: ") + str(p) for p in problems]
    if len(data) == 0:
        raise UserError(f"{root}: the '{split}' split has no usable slices"
                        + (" (data.positive_only drops slices without mask voxels)" if data_cfg.positive_only else ""))
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(data.state(), tmp))
        for old in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    return data, data.problems, 0


def print_problems(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)
