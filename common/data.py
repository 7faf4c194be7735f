"""NIfTI datasets: layout presets, subject discovery, a full-array scan, and slice preprocessing.

Conventions (all loaders, the cache and the generator share them):
  * volumes are reoriented to RAS; axial slices are taken along S and shown with anterior at the top
    and the subject's left on the image's left (`to_slices` / `from_slices` are exact inverses);
  * images are normalised per volume: the [p_lo, p_hi] percentiles of the non-zero voxels map to [0, 1],
    values outside are clipped (data.norm_percentiles, default 0.5 and 99.5); a dataset written by
    generate.py (a generation.json at its root) is already in [0, 1] and is read as written;
  * masks are {0, 1} (data.labels binary: the layout's tumour labels, any label > 0 for BraTS) or the label
    ids of the vocabulary data.labels names (brats2021, brats2023, custom; common/labels.py);
  * slices are centre-cropped (data.crop_size), zero-padded to a square and resized to data.image_size,
    bilinear with antialiasing for images, nearest for masks;
  * slices whose image channels are all zero (outside the head) are dropped; with data.positive_only
    only slices holding at least one mask voxel are kept;
  * with data.spatial_dims 3 each subject is one (C, D, H, W) volume in the same slice order: centre-cropped
    in-plane (data.crop_size), zero-padded to a square, then per axis zero-padded up to data.volume_shape
    (smaller volumes are padded, never an error) and area-downsampled (masks nearest) to it; the voxel
    spacing of that grid is kept per subject (SliceData.spacing).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from pathlib import Path

import nibabel as nib
import numpy as np   # torch is imported in the functions that use it: the config layer and --help run without it
from nibabel import orientations as ornt

from medgen.common.errors import UserError, require as _check

if TYPE_CHECKING:
    import torch

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASK_ROLE = "seg"   # the data role of a segmentation mask (label checks, nearest resizing, thresholded outputs)
GENERATED_MARKER = "generation.json"   # written by generate.py at the root of every dataset it makes
SPLIT_NAMES = ("train", "val", "test")
MAX_VOXELS = 512 ** 3        # a volume grid beyond this is a typo, refused before anything is allocated
MAX_IMAGE_SIZE = 4096


@dataclass
class DataConfig:
    data_dir: str | None = None          # None: the default root of paths.compute (locally the demo dataset)
    format: Literal["auto", "nifti", "images", "pairs"] = "auto"  # auto: image folders for mode=class; for
                                         # segment, images/ + masks/ PNG folders when present; NIfTI otherwise
    layout: Literal["original", "brats2021", "brats2023", "custom"] = "original"  # file naming preset
    modalities: dict[str, str] = field(default_factory=dict)  # layout=custom: role -> file glob, e.g. seg: "*_mask"
    mask_labels: list[int] | None = None  # allowed mask values; None: the layout's (original {0,1,2,4}, BraTS labels)
    tumour_labels: list[int] | None = None  # data.labels binary: the label ids the mask keeps; None: the layout's
                                         # (original: 1 + 4, the core without edema; BraTS: every label > 0),
                                         # e.g. [1, 2, 4] for the whole tumour of the phantoms
    labels: str = "binary"               # label vocabulary (common/labels.py): binary (one tumour mask), brats2021
                                         # (1 NCR, 2 ED, 4 ET), brats2023 (1 NCR, 2 SNFH, 3 ET) or custom
    custom_labels: dict[str, int] | None = None  # labels=custom: name -> id, e.g. {necrosis: 1, edema: 2}
    regions: dict[str, list[str]] | None = None  # labels=custom: evaluation regions as unions of label names
                                         # (None: each label, and all of them)
    image_size: int = 128                # square output size after crop/pad + resize (2D)
    spatial_dims: Literal[2, 3] = 2      # 2: axial slices; 3: whole volumes of data.volume_shape
    volume_shape: list[int] = field(default_factory=lambda: [64, 64, 48])  # spatial_dims 3: H, W (in-plane) and
                                         # D (axial slices); 64x64x48 fits a GPU with the tiny preset
    random_flip: bool | None = None      # training: random left-right flips; None: on for volumes, off for slices
    crop_size: int | None = None         # centre crop in-plane before resizing (e.g. 192 for 240x240 BraTS)
    positive_only: bool = False          # keep only slices containing any mask voxel
    norm_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # per-volume robust range -> [0,1]
    mask_mode: Literal["binary", "classes"] = "binary"  # loader only: binary masks, or raw label ids (data.labels
                                         # other than binary keeps ids by itself)
    val_fraction: float = 0.2            # flat folder of subjects: share held out for validation
    split_seed: int = 0                  # seed of that split (independent of the training seed)
    labels_csv: str | None = None        # image folders: a labels CSV instead of class folders: filename,label;
                                         # APTOS id_code,diagnosis; ISIC image + one-hot columns (detected)
    csv_image_column: str | None = None  # labels_csv: the image column, when the layout is not detected
    csv_label_column: str | None = None  # labels_csv: the label column (None with csv_image_column: one-hot)
    patient_pattern: str | None = None   # flat image folders: a regex whose first group (or whole match) in each
                                         # file name is its patient, e.g. '^(P\d+)_': a patient's images stay on
                                         # one side of the split and are one unit of the evaluation's statistics
    cache: bool = True                   # build preprocessed slices once, reuse while inputs and params match
    cache_dir: str | None = None         # None: <paths cache root>/slices
    cache_device: Literal["auto", "cpu", "cuda"] = "auto"  # where the cached tensors live during training; auto:
                                         # on the GPU when they take under a quarter of its free memory (then a
                                         # batch is gathered on the device), else host memory
    skip_bad: bool = False               # leave out subjects that fail the scan instead of stopping
    num_workers: int = 0                 # processes reading volumes while building the cache (0: in-process)

    def __post_init__(self):
        _check(self.image_size >= 8, "data.image_size must be at least 8")
        _check(self.crop_size is None or self.crop_size >= 8, "data.crop_size must be at least 8 px (or null)")
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
        _check(len(self.norm_percentiles) == 2 and 0 <= self.norm_percentiles[0] < self.norm_percentiles[1] <= 100,
               "data.norm_percentiles must be two increasing numbers in [0, 100]")
        _check(self.layout != "custom" or bool(self.modalities), "data.layout=custom needs data.modalities")
        _check(len(self.volume_shape) == 3 and min(self.volume_shape) >= 4,
               "data.volume_shape must be three sizes (H, W, D), each at least 4")
        voxels = int(np.prod(self.volume_shape, dtype=np.float64))
        _check(voxels <= MAX_VOXELS, f"data.volume_shape {self.volume_shape} holds {voxels:,} voxels "
               f"({voxels * 4 / 2 ** 30:.1f} GiB per float32 channel and sample); at most {MAX_VOXELS:,} "
               "(512x512x512) are allowed")
        if self.patient_pattern is not None:
            from medgen.common.names import patient_regex
            patient_regex(self.patient_pattern, "data.patient_pattern")
        _check(self.tumour_labels is None or (len(self.tumour_labels) > 0 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.tumour_labels)),
            "data.tumour_labels must be a list of label ids above 0 (or null)")
        _check(self.tumour_labels is None or self.labels == "binary",
               "data.tumour_labels is for binary masks (data.labels binary); a label vocabulary keeps every label")
        from medgen.common.labels import vocabulary
        vocabulary(self)      # an unknown preset, custom labels sharing an id or regions naming no label: said now
        _check(self.image_size <= MAX_IMAGE_SIZE, f"data.image_size must be at most {MAX_IMAGE_SIZE}, got "
               f"{self.image_size} ({self.image_size ** 2 * 4 / 2 ** 30:.1f} GiB per float32 channel and sample)")

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape of one sample as tensors hold it: (H, W), or (D, H, W) for volumes."""
        if self.spatial_dims == 3:
            h, w, d = self.volume_shape
            return (d, h, w)
        return (self.image_size, self.image_size)


@dataclass(frozen=True)
class Layout:
    patterns: dict[str, str]          # role -> file name glob without suffix
    mask_labels: tuple[int, ...]      # values a mask may hold
    tumour: tuple[int, ...] | None = None   # the labels a binary mask keeps (None: every label > 0)


LAYOUTS = {
    # the original research data's binary masks; label maps in BraTS 2021 ids (the demo phantoms) read as binary
    # keep the tumour itself, necrosis (1) and enhancing tumour (4), and leave out the edema (2) around it
    "original": Layout({"seg": "seg", "bravo": "bravo", "t1_pre": "t1_pre", "t1_gd": "t1_gd"}, (0, 1, 2, 4), (1, 4)),
    # BraTS: bravo is mapped onto FLAIR, the sequence on which edema shows, as in the original data.
    "brats2021": Layout({"seg": "*_seg", "t1_pre": "*_t1", "t1_gd": "*_t1ce", "t2": "*_t2", "bravo": "*_flair"},
                        (0, 1, 2, 4)),
    "brats2023": Layout({"seg": "*-seg", "t1_pre": "*-t1n", "t1_gd": "*-t1c", "t2": "*-t2w", "bravo": "*-t2f"},
                        (0, 1, 2, 3)),
}


def walk_files(root: Path):
    """Every file below root, symbolic links to folders followed (Path.rglob does not follow them, and a
    dataset assembled from links must read the same everywhere --check_data accepts it), in sorted order."""
    import os
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            yield Path(folder) / name


def nifti_files(root: Path) -> list[Path]:
    return [p for p in walk_files(root) if p.name.endswith(NIFTI_SUFFIXES)]


def is_nifti_dataset(root: Path) -> bool:
    """Any NIfTI file below root (else it is read as an image folder)."""
    return any(p.name.endswith(NIFTI_SUFFIXES) for p in walk_files(root))


def layout_from_config(data_cfg) -> Layout:
    """The layout's file patterns, and the mask values allowed: the vocabulary's (0 and its label ids) for label
    maps, else data.mask_labels or the layout's own."""
    from medgen.common.labels import vocabulary
    if data_cfg.layout == "custom":
        base = Layout(dict(data_cfg.modalities), (0, 1))
    else:
        base = LAYOUTS[data_cfg.layout]
        base = Layout({**base.patterns, **data_cfg.modalities}, base.mask_labels, base.tumour)
    vocab = vocabulary(data_cfg)
    if not vocab.binary:
        return Layout(base.patterns, (0, *vocab.ids), None)
    if data_cfg.mask_labels is not None:
        base = Layout(base.patterns, tuple(data_cfg.mask_labels), base.tumour)
    if data_cfg.tumour_labels is not None:
        base = Layout(base.patterns, base.mask_labels, tuple(data_cfg.tumour_labels))
    return base


@dataclass
class Problem:
    path: Path
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# ---------------------------------------------------------------- discovery
def _match(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for s in NIFTI_SUFFIXES for p in folder.glob(pattern + s) if p.is_file())


def _is_subject(folder: Path, layout: Layout) -> bool:
    return any(_match(folder, pat) for pat in layout.patterns.values())


def find_splits(root: Path, layout: Layout, val_fraction: float, split_seed: int) -> dict[str, list[Path]]:
    """{split: [subject folders]} from <root>/<split>/<subject>/ or a flat <root>/<subject>/ (seeded split)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder does not exist")
    named = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if named:
        splits = {s: sorted(d for d in p.iterdir() if d.is_dir() and _is_subject(d, layout)) for s, p in named.items()}
    else:
        subjects = sorted(d for d in root.iterdir() if d.is_dir() and _is_subject(d, layout))
        order = np.random.default_rng(split_seed).permutation(len(subjects))
        n_val = int(round(len(subjects) * val_fraction)) if len(subjects) > 1 else 0
        splits = {"train": sorted(subjects[i] for i in order[n_val:]),
                  "val": sorted(subjects[i] for i in order[:n_val])}
    if not any(splits.values()):
        expected = ", ".join(p + NIFTI_SUFFIXES[0] for p in layout.patterns.values())
        raise UserError(f"{root}: no subject folders found (empty folder, or no files named like {expected})")
    return splits


def subject_files(subject: Path, layout: Layout, roles: list[str]) -> tuple[dict[str, Path], list[Problem]]:
    files, problems = {}, []
    for role in roles:
        pattern = layout.patterns.get(role)
        if pattern is None:
            raise UserError(f"modality '{role}' is not defined by this layout (known: {', '.join(layout.patterns)})")
        found = _match(subject, pattern)
        if not found:
            problems.append(Problem(subject, f"missing modality '{role}' (no file matching {pattern}.nii[.gz])"))
        elif len(found) > 1:
            problems.append(Problem(subject, f"ambiguous modality '{role}': {', '.join(p.name for p in found)}"))
        else:
            files[role] = found[0]
    return files, problems


# ---------------------------------------------------------------- reading and checking
def read_volume(path: Path) -> tuple[np.ndarray | None, np.ndarray | None, Problem | None]:
    """Read the whole array (a truncated .nii.gz only fails on the last voxel) and reorient to RAS."""
    try:
        img = nib.load(str(path))
        too_big = volume_too_big(img)
        if too_big:
            return None, None, Problem(path, too_big)
        if np.dtype(img.get_data_dtype()).kind not in "biuf":
            return None, None, Problem(path, f"voxel type {img.get_data_dtype()} is not a real number type "
                                             "(complex, RGB or structured voxels are not images or masks)")
        data = np.asanyarray(img.dataobj)
        affine = img.affine
    except (EOFError, OSError, zlib.error, ValueError, MemoryError, nib.filebasedimages.ImageFileError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return None, None, Problem(path, f"unreadable or truncated file ({reason})")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        return None, None, Problem(path, f"wrong dimensionality: {data.ndim}D array of shape {data.shape}, "
                                         "expected a 3D volume or a 2D slice")
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS"))
    affine = affine @ ornt.inv_ornt_aff(transform, data.shape)     # the shape before reorientation (as nibabel)
    data = ornt.apply_orientation(data, transform)
    return np.ascontiguousarray(data), affine, None


def max_volume_bytes() -> int:
    """The largest array a header may claim: $MEDGEN_MAX_VOLUME_GB, else a quarter of this machine's memory."""
    import os
    given = os.environ.get("MEDGEN_MAX_VOLUME_GB")
    if given:
        try:
            return int(float(given) * 2 ** 30)
        except ValueError:
            raise UserError(f"MEDGEN_MAX_VOLUME_GB={given!r}: expected a number of GiB") from None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 16 * 2 ** 30


def volume_too_big(img) -> str | None:
    """Why a NIfTI header's array cannot be read here (more bytes than max_volume_bytes), checked before a
    single voxel is read: a damaged or hostile header claiming 30000^3 voxels must not exhaust the memory."""
    shape = tuple(int(n) for n in img.shape)
    need = int(np.prod(shape, dtype=np.float64)) * 4      # read as float32 at least
    limit = max_volume_bytes()
    if need > limit:
        return (f"the header claims a {'x'.join(map(str, shape))} array ({need / 2 ** 30:.1f} GiB as float32), "
                f"more than the {limit / 2 ** 30:.1f} GiB allowed (MEDGEN_MAX_VOLUME_GB raises it): unreadable here")
    return None


def check_volumes(files: dict[str, Path], vols: dict[str, np.ndarray], affines: dict, layout: Layout) -> list[Problem]:
    problems = []
    ref = "seg" if "seg" in vols else next(iter(vols))
    for role, vol in vols.items():
        path = files[role]
        if role != ref and vol.shape != vols[ref].shape:
            problems.append(Problem(path, f"shape {vol.shape} differs from {files[ref].name} {vols[ref].shape}"))
        elif role != ref and not np.allclose(affines[role], affines[ref], atol=1e-3):
            problems.append(Problem(path, f"affine differs from {files[ref].name} (not in the same space)"))
        n_bad = int(np.size(vol) - np.count_nonzero(np.isfinite(vol))) if vol.dtype.kind == "f" else 0
        if n_bad:
            problems.append(Problem(path, f"{n_bad} NaN/inf voxels"))
            continue
        if role == MASK_ROLE:
            values = np.unique(vol)
            if not np.all(np.isin(values, layout.mask_labels)):
                bad = values[~np.isin(values, layout.mask_labels)]
                shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
                problems.append(Problem(path, f"mask values {{{shown}}} are not labels of this dataset's vocabulary "
                                              f"{{{', '.join(map(str, layout.mask_labels))}}} (data.labels names "
                                              "it; data.mask_labels for binary masks)"))
            elif not values.any():
                problems.append(Problem(path, "empty mask (no tumour voxels)", fatal=False))
        elif not np.any(vol):
            problems.append(Problem(path, "all-zero image"))
    return problems


def load_subject(subject: Path, layout: Layout, roles: list[str], affines_out: dict | None = None
                 ) -> tuple[dict[str, np.ndarray], list[Problem]]:
    """Read and check every modality of one subject; volumes are returned only when nothing fatal was found
    (their RAS affines are put in `affines_out` when it is given)."""
    files, problems = subject_files(subject, layout, roles)
    vols, affines = {}, {}
    for role, path in files.items():
        vol, affine, problem = read_volume(path)
        if problem:
            problems.append(problem)
        else:
            vols[role], affines[role] = vol, affine
    if vols:
        problems += check_volumes(files, vols, affines, layout)
        problems += companion_problems(subject, layout, [r for r in layout.patterns if r not in files], files, vols)
    if affines_out is not None:
        affines_out.update(affines)
    return ({} if any(p.fatal for p in problems) else vols), problems


def companion_problems(subject: Path, layout: Layout, others: list[str], files: dict, vols: dict) -> list[Problem]:
    """The subject's files of the layout's other roles, when present, must share the grid of what was read (a job
    that reads only the masks still keeps their scans registered to them): a header-only check."""
    ref = "seg" if "seg" in vols else next(iter(vols))
    problems = []
    for role in others:
        paths = _match(subject, layout.patterns[role])
        if len(paths) != 1:
            continue                     # absent (a masks-only folder) or ambiguous: nothing to compare here
        try:
            img = nib.load(str(paths[0]))
            shape = tuple(img.shape[:3]) + (1,) * (3 - len(img.shape[:3]))
            axes = ornt.io_orientation(img.affine)[:, 0]
        except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError):
            continue                     # not this job's file: reading it is the job that uses it
        ras = [0, 0, 0]
        for i, axis in enumerate(axes[:3]):
            ras[int(axis) if axis == axis else i] = shape[i]
        if tuple(ras) != vols[ref].shape:
            problems.append(Problem(paths[0], f"shape {tuple(ras)} differs from {files[ref].name} "
                                              f"{vols[ref].shape} (the subject's files are not on one grid)"))
    return problems


# ---------------------------------------------------------------- preprocessing
def to_slices(vol: np.ndarray) -> np.ndarray:
    """RAS volume (X, Y, Z) -> axial slices (Z, H, W), anterior at the top, left on the left."""
    return np.ascontiguousarray(np.flip(vol, 1).transpose(2, 1, 0))


def from_slices(slices: np.ndarray) -> np.ndarray:
    """Inverse of to_slices: (Z, H, W) -> RAS volume (X, Y, Z)."""
    return np.ascontiguousarray(np.flip(slices.transpose(2, 1, 0), 1))


def is_generated(root: Path) -> bool:
    """A dataset written by generate.py: its images are already normalised to [0, 1]."""
    return (Path(root) / GENERATED_MARKER).is_file()


def normalise(vol: np.ndarray, percentiles: tuple[float, float] | None = (0.5, 99.5)) -> np.ndarray:
    """Percentiles of the non-zero voxels -> [0, 1]; None: the volume is already in [0, 1] (clipped only)."""
    vol = vol.astype(np.float32)
    if percentiles is None:
        return np.clip(vol, 0.0, 1.0)
    fg = vol[vol > 0]
    if fg.size == 0:
        return np.zeros_like(vol)
    lo, hi = np.percentile(fg, percentiles)
    if hi <= lo:
        return (vol > 0).astype(np.float32)
    return np.clip((vol - lo) / (hi - lo), 0.0, 1.0)


def pad_square(x: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """Zero-pad the last two axes, centred, to side x side (default: the longer of the two)."""
    import torch.nn.functional as F
    h, w = x.shape[-2:]
    side = max(h, w) if side is None else side
    ph, pw = side - h, side - w
    return x if (ph, pw) == (0, 0) else F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def fit_square(x: torch.Tensor, size: int, crop: int | None, mode: str) -> torch.Tensor:
    """(N, C, H, W): centre crop to `crop`, zero-pad to a square, resize to size x size."""
    import torch.nn.functional as F
    h, w = x.shape[-2:]
    if crop is not None:
        top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        x = x[..., top:top + crop, left:left + crop]
        h, w = x.shape[-2:]
    side = max(h, w)
    x = pad_square(x, side)
    if side == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)


def unfit_square(x: torch.Tensor, shape: tuple[int, int], mode: str, crop: int | None) -> torch.Tensor:
    """The inverse of fit_square(., size, crop, mode): (C, s, s) at the model's size back to an input slice of
    shape (H, W): resized to the padded square, its padding removed, and placed where the crop was cut; zero
    outside the crop. Image folders are read with crop = the shorter side; NIfTI slices with data.crop_size."""
    import torch.nn.functional as F
    h, w = shape
    ch, cw = (h, w) if crop is None else (min(h, crop), min(w, crop))
    side = max(ch, cw)
    if x.shape[-1] != side:
        x = (F.interpolate(x[None], size=(side, side), mode="nearest-exact") if mode == "nearest" else
             F.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=False,
                           antialias=x.shape[-1] > side))[0]
    pt, pl = (side - ch) // 2, (side - cw) // 2               # pad_square's offsets
    top, left = (h - ch) // 2, (w - cw) // 2                  # fit_square's crop offsets
    out = x.new_zeros((x.shape[0], h, w))
    out[:, top:top + ch, left:left + cw] = x[:, pt:pt + ch, pl:pl + cw]
    return out


def ras_shape(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[int, int, int]:
    """The shape that read_volume's RAS reorientation gives an array of `shape` with `affine`."""
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS"))):
        out[int(target)] = shape[axis]
    return tuple(out)


def oriented_like(ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A RAS array (as read_volume returns it) back in the axis order and directions of the file whose affine is
    `affine`, so that it is written with that file's own affine."""
    back = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.io_orientation(affine))
    return np.ascontiguousarray(ornt.apply_orientation(ras, back))


def fit_volume(x: torch.Tensor, shape: tuple[int, int, int], crop: int | None, mode: str) -> torch.Tensor:
    """(N, C, D, H, W): centre crop in-plane to `crop`, zero-pad in-plane to a square, then per axis zero-pad up to
    `shape` (D, H, W) and downsample what is larger (area for images, nearest for masks)."""
    import torch.nn.functional as F
    n, c, d, h, w = x.shape
    x = fit_square(x.reshape(n, c * d, h, w), max(h, w) if crop is None else min(crop, max(h, w)), crop, mode)
    x = x.reshape(n, c, d, *x.shape[-2:])
    pads = []
    for size, want in zip(reversed(x.shape[2:]), reversed(shape)):
        extra = max(0, want - size)
        pads += [extra // 2, extra - extra // 2]
    x = F.pad(x, pads)
    if tuple(x.shape[2:]) != tuple(shape):
        x = F.interpolate(x, size=tuple(shape), mode="nearest-exact" if mode == "nearest" else "area")
    return x


def grid_spacing(spacing: tuple[float, float, float], source: tuple[int, int, int], shape: tuple[int, int, int],
                 crop: int | None) -> list[float]:
    """Voxel spacing (D, H, W order, mm) of fit_volume's output grid, from the input spacing and (D, H, W) size."""
    d, h, w = source
    side = max(h, w) if crop is None else min(crop, max(h, w))
    return [float(sp * max(n, want) / want) for sp, n, want in zip(spacing, (d, side, side), shape)]


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """(D, H, W) = (S, A, R) voxel sizes of a RAS affine, in the slice order to_slices gives."""
    x, y, z = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    return float(z), float(y), float(x)


@dataclass
class Preprocess:
    image_size: int
    crop_size: int | None = None
    percentiles: tuple[float, float] | None = (0.5, 99.5)  # None: already in [0, 1] (generated data)
    mask_mode: str = "binary"               # binary: the tumour labels as {0, 1}; classes: the label ids as they are
    positive_only: bool = False
    image_roles: list[str] = field(default_factory=list)
    with_mask: bool = True
    volume_shape: tuple[int, int, int] | None = None    # (D, H, W): whole volumes instead of slices
    tumour: tuple[int, ...] | None = None   # binary: the labels that make the mask (None: every label > 0)

    def __call__(self, vols: dict[str, np.ndarray], spacing=(1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
        """Volumes of one subject -> {'images': (S, C, H, W) float32, 'masks': (S, 1, H, W) uint8, 'index': (S,)};
        with volume_shape one (1, C, D, H, W) volume, index [-1] and its grid 'spacing' (1, 3)."""
        import torch
        imgs = np.stack([to_slices(normalise(vols[r], self.percentiles)) for r in self.image_roles], 1) \
            if self.image_roles else None
        mask = None
        if self.with_mask:
            seg = to_slices(vols["seg"])
            if self.mask_mode != "binary":
                mask = np.rint(seg)
            else:
                mask = seg > 0 if self.tumour is None else np.isin(seg, self.tumour)
            mask = mask.astype(np.uint8)[:, None]
        if self.volume_shape is not None:
            return self.volume(imgs, mask, spacing)
        keep = np.ones(len(mask if mask is not None else imgs), bool)
        if imgs is not None:
            keep &= imgs.reshape(len(imgs), -1).any(1)
        if self.positive_only and mask is not None:
            keep &= mask.reshape(len(mask), -1).any(1)
        out = {"index": torch.from_numpy(np.flatnonzero(keep))}
        if imgs is not None:
            out["images"] = fit_square(torch.from_numpy(imgs[keep]), self.image_size, self.crop_size, "bilinear")
            out["images"] = out["images"].clamp_(0, 1)
        if mask is not None:
            m = fit_square(torch.from_numpy(mask[keep]).float(), self.image_size, self.crop_size, "nearest")
            out["masks"] = m.to(torch.uint8)
        return out

    def volume(self, imgs: np.ndarray | None, mask: np.ndarray | None, spacing) -> dict[str, torch.Tensor]:
        """(Z, C, H, W) slices of one subject -> one volume on the configured grid (none when positive_only and
        the mask is empty)."""
        import torch
        source = imgs if imgs is not None else mask
        n = 0 if self.positive_only and mask is not None and not mask.any() else 1
        grid = grid_spacing(spacing, (source.shape[0], *source.shape[2:]), self.volume_shape, self.crop_size)
        out = {"index": torch.full((n,), -1), "spacing": torch.tensor([grid] * n)}
        as_volume = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(1, 0, 2, 3)))[None].float()  # noqa: E731
        if imgs is not None:
            out["images"] = fit_volume(as_volume(imgs), self.volume_shape, self.crop_size, "area").clamp_(0, 1)[:n]
        if mask is not None:
            out["masks"] = fit_volume(as_volume(mask), self.volume_shape, self.crop_size, "nearest").to(torch.uint8)[:n]
        return out
