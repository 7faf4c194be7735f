"""Writing generated samples: fresh NIfTI and PNG files, one atomic commit row per sample, the merged
manifest.csv, and preview grids read back from the files."""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
from pathlib import Path
import nibabel as nib
import numpy as np
import torch
from PIL import Image

from medgen.common.data import GENERATED_MARKER, MASK_ROLE, from_slices, to_slices
from medgen.common.errors import UserError
from medgen.common.names import inside
from medgen.common.outputs import claim
from medgen.common.fileio import atomic_write, atomic_write_text, exclusive_write_text, remove_stale_tmp
from medgen.common.grid import mid_planes, save_grid

ROWS_DIR = ".rows"
SETTINGS_FILE = GENERATED_MARKER  # also tells the loaders that the images are already in [0, 1]
MASK_STREAM, IMAGE_STREAM = 0, 1
MANIFEST_FIELDS = ("index", "sample_id", "seed", "sample_seed", "strategy", "sampler", "steps", "guidance",
                   "class", "condition", "mask_attempts", "mask_rejections", "checkpoint_sha256", "seg_strategy",
                   "seg_sampler", "seg_steps", "seg_checkpoint_sha256", "files", "copy_rejections", "copy_distance",
                   "label_voxels", "nesting_violations", "lesion", "placement_shift")


def sample_id(index: int) -> str:
    return f"sample_{index:06d}"


def sample_seed(seed: int, index: int, stream: int, attempt: int = 0) -> int:
    """A 63-bit seed for one sample's noise, statistically independent across (seed, index, stream, attempt)."""
    hi, lo = np.random.SeedSequence([seed, index, stream, attempt]).generate_state(2, np.uint32)
    return (int(hi) << 32 | int(lo)) & (2**63 - 1)


def nifti_bytes(image: np.ndarray, is_mask: bool, spacing=None) -> bytes:
    """A (H, W) slice or a (D, H, W) volume as a fresh NIfTI (RAS; voxel sizes `spacing` in (D, H, W) order, else
    1 mm; empty description and aux file, no extensions), gzip with mtime 0 so the same array always gives the
    same bytes."""
    vol = from_slices(image[None] if image.ndim == 2 else image)
    affine = np.eye(4)
    if spacing is not None:
        affine[[2, 1, 0], [2, 1, 0]] = spacing
    img = nib.Nifti1Image(vol.astype(np.uint8 if is_mask else np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b""
    img.header["aux_file"] = b""
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def png_bytes(image: np.ndarray, label_map: bool = False) -> bytes:
    """(C, H, W) in [0, 1] -> 8-bit grey or RGB PNG; a (C, D, H, W) volume as its three mid-planes side by side.
    A label map is written as its label ids (0, 1, 2, 4: as label PNGs are stored), not scaled."""
    if image.ndim == 4:
        image = torch.cat(list(mid_planes(torch.from_numpy(image)[None])), -1).numpy()
    arr = np.rint(image).astype(np.uint8) if label_map else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr[:3].transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def write_sample(out: Path, index: int, file_roles: list[tuple[str, str]], arrays: dict[str, torch.Tensor],
                 row: dict, spacing=None, label_maps: bool = False) -> dict:
    """Write one sample's files ([(relative file, role)], each atomically, nothing outside `out`), then its manifest
    row as the commit mark; returns the row. label_maps: masks are label maps (their PNGs hold the ids)."""
    for rel, role in file_roles:
        arr = arrays[role].numpy()
        if rel.endswith(".nii.gz"):
            data = nifti_bytes(arr[0], role == MASK_ROLE, spacing)
        else:
            data = png_bytes(arr, label_maps and role == MASK_ROLE)
        atomic_write(inside(out, rel), lambda tmp, d=data: Path(tmp).write_bytes(d))
    atomic_write_text(out / ROWS_DIR / f"{sample_id(index)}.json", json.dumps(row))  # the commit mark
    return row


def is_done(out: Path, index: int, files: list[str]) -> bool:
    """Whether sample `index` was committed with all its files."""
    row = out / ROWS_DIR / f"{sample_id(index)}.json"
    return row.is_file() and all((out / f).is_file() for f in files)


def read_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((Path(out) / ROWS_DIR).glob("sample_*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # cannot happen for rows written atomically; a hand-edited file is simply not listed
    return sorted(rows, key=lambda r: r["index"])


def open_output_dir(out: Path, settings_file: str, settings: dict, record: dict | None = None,
                    inputs: dict | None = None, kind: str = "generate") -> bool:
    """Claim out for a `kind` job (common/outputs.py: new, empty or made by the same kind of job; apart from
    `inputs`, {flag: path}), remove temp files a kill left there 10 minutes or more ago (other shards may be
    writing now) and record the settings that decide its contents; a folder made with other settings is refused.
    The file is created exclusively (the first of several starting jobs writes it, every one then compares), so
    two jobs with different settings cannot both pass. `record`: more that the file keeps (provenance), written
    beside the settings but not compared. Returns whether this call created the settings file (a job that then
    fails before its first sample removes it again: forget_settings)."""
    claim(out, kind, "--output_dir", inputs, own=(settings_file,))
    remove_stale_tmp(out, older_than_s=600)
    path = out / settings_file
    created = False
    if not path.is_file():
        with contextlib.suppress(FileExistsError):
            exclusive_write_text(path, json.dumps({**settings, **(record or {})}, indent=2))
            created = True
    old = _settings(path)
    keys = [k for k in settings if old.get(k) != settings[k] and not (k == "contents" and k not in old)]
    diff = [_setting_change(k, old.get(k), settings[k]) for k in keys]
    if "contents" in keys:            # (a folder made before contents were recorded is compared by path only)
        changed = [f for f, d in settings["contents"].items() if old["contents"].get(f) != d]
        diff[keys.index("contents")] = f"the files read from {' and '.join(changed) or 'the inputs'} changed"
    if diff:
        raise UserError(f"--output_dir {out} holds samples made with different settings ({'; '.join(diff)}): "
                        f"use a new --output_dir, rerun with the folder's settings to continue it, or delete {out} "
                        "to start over")
    return created


def _setting_change(key: str, was, now) -> str:
    """'steps: 10 there, 20 now' (long values, such as checkpoint digests, cut short)."""
    def shown(v):
        text = json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"{key}: {shown(was)} there, {shown(now)} now"


def forget_settings(out: Path, settings_file: str) -> None:
    """After a job that created the settings file failed before committing a sample: remove the file, so that
    the corrected command is not refused as 'made with different settings' by a folder that holds nothing."""
    if not any((Path(out) / ROWS_DIR).glob("sample_*.json")):
        (Path(out) / settings_file).unlink(missing_ok=True)


def _settings(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{path}: damaged (not the JSON settings medgen writes); give a new --output_dir")
    return record


def write_manifest(out: Path, fields: tuple[str, ...] = MANIFEST_FIELDS) -> list[dict]:
    """manifest.csv from every committed row, in index order; returns the rows."""
    rows = read_rows(out)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    atomic_write(Path(out) / "manifest.csv", write)
    return rows


def read_sample(out: Path, row: dict) -> dict[str, np.ndarray]:
    """{role: (C, H, W) float array in [0, 1]} of a committed sample, (C, D, H, W) for a volume, read back from its
    files (NIfTI for subject samples, the PNG for class samples)."""
    files = row["files"].split(";")
    arrays = {}
    for rel in files:
        path = Path(out) / rel
        if rel.endswith(".nii.gz"):
            slices = to_slices(np.asanyarray(nib.load(str(path)).dataobj)).astype(np.float32)
            arrays[path.name.split(".")[0]] = slices[None] if len(slices) > 1 else slices
    if not arrays:
        img = np.asarray(Image.open(Path(out) / files[0]), dtype=np.float32) / 255
        arrays["image"] = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    return arrays


def write_previews(out: Path, rows: list[dict], roles: list[str]) -> list[Path]:
    """preview_4x4.png and preview_8x8.png from the first committed samples (mask outlines on images)."""
    picked = [read_sample(out, r) for r in rows[:64]]
    if not picked:
        return []
    show = next((r for r in reversed(roles) if r != MASK_ROLE), MASK_ROLE)
    images = torch.stack([torch.from_numpy(a[show]) for a in picked])
    outline = show != MASK_ROLE and all(MASK_ROLE in a for a in picked)   # masks drawn over the images
    masks = torch.stack([torch.from_numpy(a[MASK_ROLE]) for a in picked]) if outline else None
    return [save_grid(images[:side * side], out / f"preview_{side}x{side}.png", nrow=side,
                      masks=None if masks is None else masks[:side * side], scale=max(1, 128 // max(images.shape[2:])))
            for side in (4, 8)]
