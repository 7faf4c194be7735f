"""Masks for new images with a trained mask-given-image model (segment mode): generate.py --images_from DIR.

Each image gets `ensemble` samples, each from its own seed (seed, index, member), so a mask does not depend
on the batch or on an interruption. Written per image: the ensemble mean thresholded at 0.5 (the mask), the
mean itself (a soft mask) and the standard deviation over the members (an uncertainty map). When DIR has
ground-truth masks, Dice and IoU per image go into the manifest and the overall figures into
segmentation.json and segmentation.md. Inputs: a NIfTI dataset (slices of mode.segment.image_key, with seg files
when present, preprocessed as the model's training data), DIR/images/ (+ DIR/masks/) PNG folders, or a flat
folder of images. Every image's files are written atomically, then its row: a re-run continues. Outputs are
put back on the inputs' own geometry: PNG masks at each image's size, NIfTI masks as one volume per subject on
its scan's grid and affine (write_volumes), beside the per-slice files on the model's grid.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from tqdm import tqdm

from medgen.common import data as nifti
from medgen.common import imagefolder
from medgen.common.data import unfit_square
from medgen.common.errors import UserError
from medgen.common.labels import decode
from medgen.common.fileio import atomic_write, atomic_write_text
from medgen.common.locks import locked
from medgen.common.names import inside
from medgen.common.overlap import dice_iou, region_dice
from medgen.Generation.TrainGen.core.generation.writers import (IMAGE_STREAM, ROWS_DIR, open_output_dir, sample_id,
                                                          sample_seed, write_manifest)
from medgen.Generation.TrainGen.core.sampling import sample

SETTINGS = "segmentation_settings.json"
FIELDS = ("index", "source", "seed", "ensemble", "sampler", "steps", "checkpoint_sha256", "mask_area", "dice", "iou",
          "dice_regions", "files")


@dataclass
class ImageSet:
    images: torch.Tensor            # (N, C, H, W) in [0, 1]
    masks: torch.Tensor | None      # (N, 1, H, W) {0, 1} ground truth, when the folder has it
    sources: list[str]             # '<subject>#slice<k>' or the image file
    nifti: bool
    sizes: list[tuple[int, int]] | None = None   # image files: each one's (H, W), where its masks are written
    volumes: dict[str, tuple[Path, str]] | None = None   # NIfTI: subject -> (its image file, its name under DIR)
    crop: int | None = None                      # NIfTI: the model's data.crop_size (undone on the way back)
    root: str | None = None                      # the folder they were read from (kept apart from the output)


def read_images(directory: str, model, skip_bad: bool = False, compute: str = "auto") -> ImageSet:
    """The images of DIR preprocessed as the model's training data (its size; NIfTI: its layout and crop)."""
    from medgen.config.paths import PathConfig
    from medgen.common.dataset import load_folder
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--images_from {root}: folder does not exist")
    size = model.cfg.data.image_size
    if nifti.is_nifti_dataset(root):
        cfg = replace(model.cfg.data, data_dir=str(root), positive_only=False, format="nifti", skip_bad=skip_bad,
                      val_fraction=0.0)
        layout = nifti.layout_from_config(cfg)
        subjects = [s for split in nifti.find_splits(root, layout, 0.0, 0).values() for s in split]
        with_masks = all(nifti.subject_files(s, layout, ["seg"])[0] for s in subjects)
        key = model.cfg.mode.segment.image_key
        cache = PathConfig.from_compute(compute).slice_cache if cfg.cache else None
        data = load_folder(cfg, root, [key, "seg"] if with_masks else [key], cache)
        volumes = {str(s.resolve()): (nifti.subject_files(s, layout, [key])[0][key], s.relative_to(root).as_posix())
                   for s in subjects}
        return ImageSet(data.images.float(), data.masks.float() if with_masks else None, data.slice_keys(), True,
                        volumes=volumes, crop=cfg.crop_size, root=str(root))
    if (root / "images").is_dir():
        items, problems = imagefolder.pairs_in(root, need_masks=False)
    else:
        items, problems = [(p, None) for p in imagefolder.images_in(root)], []
        if not items:
            raise UserError(f"--images_from {root}: no NIfTI files, images/ folder or images found")
    tensors, bad = imagefolder.load_pairs(items, size)
    problems += bad
    if problems and not skip_bad:
        raise UserError(f"{len(problems)} problem(s) in {root} (use --skip_bad to leave those images out):\n  "
                        + "\n  ".join(map(str, problems)))
    masks = tensors["masks"].float() if tensors["masks"] is not None else None
    return ImageSet(tensors["images"].float(), masks, tensors["files"], False, tensors["sizes"], root=str(root))


def _files(images: ImageSet, index: int) -> dict[str, str]:
    if images.nifti:
        sid = sample_id(index)
        return {k: f"{sid}/{k}.nii.gz" for k in ("seg", "seg_mean", "seg_std")}
    stem = Path(images.sources[index]).stem
    return {"seg": f"masks/{stem}.png", "seg_mean": f"mean/{stem}.png", "seg_std": f"uncertainty/{stem}.png"}


def at_input(images: ImageSet, index: int, x: torch.Tensor, how: str) -> torch.Tensor:
    """An output at the model's size, back at its image file's own size (NIfTI slices stay on the model grid;
    write_volumes puts them back on each subject's grid)."""
    return x if images.sizes is None else unfit_square(x, images.sizes[index], how, min(images.sizes[index]))


def _write(out: Path, rel: str, array: np.ndarray, is_mask: bool, spacing=None) -> None:
    from medgen.Generation.TrainGen.core.generation.writers import nifti_bytes, png_bytes
    data = nifti_bytes(array[0], is_mask, spacing) if rel.endswith(".nii.gz") else png_bytes(array)
    atomic_write(inside(out, rel), lambda tmp: Path(tmp).write_bytes(data))


def segment(model, images: ImageSet, out: Path, ensemble: int, batch_size: int, seed: int, device,
            autocast=None) -> dict:
    """Segment every image not yet done; then write the manifest and the summary. Returns the summary."""
    if images.images.shape[1] != (model.meta.get("image_channels") or 1):
        raise UserError(f"--images_from has {images.images.shape[1]}-channel images; the model was trained on "
                        f"{model.meta.get('image_channels')}-channel ones")
    open_output_dir(out, SETTINGS, {"sha256": model.sha256, "sampler": model.sampler, "steps": model.steps,
                                    "ensemble": ensemble, "seed": seed, "sources": len(images.sources)},
                    inputs={"--image_model": str(model.path), "--images_from": images.root}, kind="segment")
    with locked(out, "--output_dir"):
        return _segment_todo(model, images, out, ensemble, batch_size, seed, device, autocast)


def segment_batch(model, images: torch.Tensor, idx: list[int], ensemble: int, seed: int, device, autocast=None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks, ensemble mean, ensemble std) on the CPU for images[idx]: member e of image i draws its noise from
    the seed (seed, i, e), so an image's masks do not depend on the batch it is in. A member's channels are
    averaged over the ensemble and the average decoded (a binary mask, or a label map with the model's
    vocabulary); mean and std are those of the lesion (any label) channel, the largest label channel."""
    cond = {"concat": images[idx].to(device) * 2 - 1}
    members = []
    for e in range(ensemble):
        gens = [torch.Generator(device).manual_seed(sample_seed(seed, i, IMAGE_STREAM, e)) for i in idx]
        noise = torch.stack([torch.randn(model.mode.out_channels, *model.shape, generator=g, device=device)
                             for g in gens])
        x = sample(model.net, model.strategy, model.mode, cond, noise, model.sampler, model.steps, 1.0, gens,
                   autocast)
        members.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    stack = torch.stack(members)                                 # (E, B, K, ...) in [0, 1]
    lesion = stack.amax(2, keepdim=True)
    return decode(stack.mean(0) * 2 - 1, model.mode.vocab), lesion.mean(0), lesion.std(0, unbiased=False)


def _segment_todo(model, images: ImageSet, out: Path, ensemble: int, batch_size: int, seed: int, device,
                  autocast) -> dict:
    todo = [i for i in range(len(images.sources)) if not (out / ROWS_DIR / f"{sample_id(i)}.json").is_file()]
    for start in tqdm(range(0, len(todo), batch_size), desc="segmenting", unit="batch", disable=not todo):
        idx = todo[start:start + batch_size]
        masks, mean, std = segment_batch(model, images.images, idx, ensemble, seed, device, autocast)
        for k, i in enumerate(idx):
            mask = masks[k]
            files = _files(images, i)
            spacing = model.meta.get("spacing")
            _write(out, files["seg"], at_input(images, i, mask, "nearest").numpy(), True, spacing)
            _write(out, files["seg_mean"], at_input(images, i, mean[k], "bilinear").numpy(), False, spacing)
            _write(out, files["seg_std"], at_input(images, i, (2 * std[k]).clamp(0, 1), "bilinear").numpy(), False,
                   spacing)  # std <= 0.5: to [0, 1]
            row = {"index": i, "source": images.sources[i], "seed": seed, "ensemble": ensemble,
                   "sampler": model.sampler, "steps": model.steps, "checkpoint_sha256": model.sha256,
                   "mask_area": float((mask > 0).float().mean()), "dice": "", "iou": "", "dice_regions": "",
                   "files": ";".join(files.values())}
            if images.masks is not None:
                row["dice"], row["iou"] = dice_iou((mask > 0).float(), (images.masks[i] > 0).float())
                if not model.mode.vocab.binary:
                    regions = region_dice(mask, images.masks[i], model.mode.vocab)
                    row["dice_regions"] = ";".join(f"{k}:{v:.5f}" for k, v in regions.items())
            atomic_write_text(out / ROWS_DIR / f"{sample_id(i)}.json", json.dumps(row))
    if images.volumes is not None:
        write_volumes(out, images)
    return write_summary(out, images.masks is not None, len(todo))


VOLUMES_DIR = "volumes"


def write_volumes(out: Path, images: ImageSet) -> None:
    """NIfTI inputs: every subject's outputs as volumes on the grid of its image file (shape, axis order and
    affine: they overlay the input scan in any viewer), VOLUMES_DIR/<subject>/{seg,seg_mean,seg_std}.nii.gz,
    assembled from the slices written (each one's crop, padding and resize undone; a slice that was not
    segmented, an all-zero image, stays 0)."""
    import nibabel as nib
    by_subject: dict[str, list[tuple[int, int]]] = {}
    for i, src in enumerate(images.sources):
        subject, k = src.rsplit("#slice", 1)
        by_subject.setdefault(subject, []).append((int(k), i))
    for subject, members in by_subject.items():
        image_file, name = images.volumes[subject]
        source = nib.load(str(image_file))
        x, y, z = nifti.ras_shape((source.shape + (1,))[:3], source.affine)
        for role, is_mask in (("seg", True), ("seg_mean", False), ("seg_std", False)):
            slices = np.zeros((z, y, x), np.float32)                     # to_slices' (Z, H, W) of the subject
            for k, i in members:
                vol, _, problem = nifti.read_volume(out / _files(images, i)[role])
                if problem:
                    raise UserError(f"{problem} (remove {out / ROWS_DIR / (sample_id(i) + '.json')} and re-run to "
                                    "segment that image again)")
                slices[k] = unfit_square(torch.from_numpy(nifti.to_slices(vol)).float(), (y, x),
                                         "nearest" if is_mask else "bilinear", images.crop)[0].numpy()
            data = nifti.oriented_like(nifti.from_slices(slices), source.affine)
            img = nib.Nifti1Image(data.astype(np.uint8) if is_mask else data, source.affine)
            img.header.set_xyzt_units(*source.header.get_xyzt_units())
            payload = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
            atomic_write(inside(out, f"{VOLUMES_DIR}/{name}/{role}.nii.gz"), lambda tmp: Path(tmp).write_bytes(payload))


def write_summary(out: Path, with_truth: bool, made: int) -> dict:
    rows = write_manifest(out, FIELDS)
    summary = {"images": len(rows), "segmented_now": made, "ensemble": rows[0]["ensemble"] if rows else None}
    if with_truth and rows:
        dice = np.array([r["dice"] for r in rows], np.float64)
        iou = np.array([r["iou"] for r in rows], np.float64)
        summary.update({"dice_mean": float(dice.mean()), "dice_std": float(dice.std()), "iou_mean": float(iou.mean()),
                        "iou_std": float(iou.std()),
                        "worst": [{"source": r["source"], "dice": r["dice"]}
                                  for r in sorted(rows, key=lambda r: r["dice"])[:10]]})
        regions = [dict((k, float(v)) for k, v in (x.split(":") for x in r["dice_regions"].split(";")))
                   for r in rows if r.get("dice_regions")]
        if regions:       # label maps: Dice per region (the lesion row above is every label together)
            summary["regions"] = {k: {"mean": float(np.mean([g[k] for g in regions])),
                                      "std": float(np.std([g[k] for g in regions]))} for k in regions[0]}
    atomic_write_text(out / "segmentation.json", json.dumps(summary, indent=2))
    lines = [f"# Segmentation of {len(rows)} images", ""]
    if "dice_mean" in summary:
        per_region = [[f"Dice {k}", f"{v['mean']:.4f}", f"{v['std']:.4f}", len(rows)]
                      for k, v in summary.get("regions", {}).items()]
        lines += [tabulate([["Dice", f"{summary['dice_mean']:.4f}", f"{summary['dice_std']:.4f}", len(rows)],
                            ["IoU", f"{summary['iou_mean']:.4f}", f"{summary['iou_std']:.4f}", len(rows)],
                            *per_region],
                           headers=["metric", "mean over images", "std", "N"], tablefmt="github"), "",
                  "Lowest Dice: " + ", ".join(f"{w['source']} ({w['dice']:.3f})" for w in summary["worst"])]
    else:
        lines.append("No ground-truth masks in the input folder: masks, mean and uncertainty maps only.")
    atomic_write_text(out / "segmentation.md", "\n".join(lines) + "\n")
    return summary
