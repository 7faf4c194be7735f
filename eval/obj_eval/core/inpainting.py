"""Evaluation of edited scans (generate.py --inpaint_into): each sample is paired with the real slice it was made
from (the manifest's condition), and its regenerated region (region.nii.gz) separates what was edited from what
was kept.

  inpaint_outside_max_abs_diff  the largest |synthetic - source| outside the region over every pair: exactly 0
                                when the scan was kept as acquired (as read by the loaders)
  inpaint_seam                  the mean gradient magnitude on the region's border band (one pixel either side)
                                of the edited slice over that of the source slice at the same pixels, leaving out
                                the band pixels within LESION_EDGE px of the inserted lesion (there the lesion's own
                                edge, not a seam, raises the gradient: a perfect insertion scored 2.0 at margin 0,
                                1.4 at 1 and 1.06 at 2 px with them): 1 is a seam as smooth as the scan's own
                                tissue, above 1 a visible edge; bootstrap CI over pairs. A pair whose whole band
                                lies by the lesion (--inpaint_margin 0-1) cannot be scored, and is counted
  inpaint_contrast_<label>      per label of the inserted lesion (the written mask inside the region): its mean
                                intensity over the mean of normal tissue outside the region, for the edited slice,
                                beside the same ratio of the source slice's pixels (what was there before: about 1
                                for healthy tissue, which is what a blank or untouched region would score)
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medgen.common.data import GENERATED_MARKER, fit_square, to_slices
from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.inpainting import dilate
from medgen.eval.obj_eval.core import metrics as M
from medgen.eval.obj_eval.core.inputs import pair


def is_inpainted(root) -> bool:
    """A folder written by generate.py --inpaint_into (its generation.json records the insertion)."""
    path = Path(root) / GENERATED_MARKER
    try:
        return path.is_file() and bool(json.loads(path.read_text()).get("inpaint"))
    except (OSError, ValueError):
        return False


def sample_files(root, ids: list[str], name: str, size: int) -> torch.Tensor:
    """(N, 1, H, W) the `name`.nii.gz of each synthetic slice (region, seg), from its sample folder, at `size`."""
    out = []
    for sample_key in ids:
        path = Path(root) / sample_key.split("#")[0] / f"{name}.nii.gz"
        if not path.is_file():
            raise UserError(f"--synthetic-dir {root}: {path} is missing (not a --inpaint_into dataset?)")
        arr = to_slices(np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32))
        k = int(sample_key.split("#slice")[1]) if "#slice" in sample_key else 0
        out.append(torch.from_numpy(arr[k])[None])
    maps = torch.stack(out)
    return fit_square(maps, size, None, "nearest") if maps.shape[-1] != size else maps


def gradient(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) gradient magnitude by central differences (replicate padding)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2
    return (gx ** 2 + gy ** 2).sqrt()


LESION_EDGE = 2     # px: band pixels this close to the inserted lesion are left out of the seam score


def seam_ratios(edited: torch.Tensor, source: torch.Tensor, region: torch.Tensor, lesion: torch.Tensor
                ) -> tuple[np.ndarray, int]:
    """(edited / source mean gradient on each pair's border band away from the lesion, pairs with no such band
    pixel): the inpaint_seam score of the module docstring."""
    region = region.float()
    band = (F.max_pool2d(region, 3, 1, 1) - (-F.max_pool2d(-region, 3, 1, 1))) > 0.5     # dilated - eroded
    band = band & ~(dilate(lesion, LESION_EDGE) > 0.5)
    ga, gb = gradient(edited.float()), gradient(source.float())
    n_band = band.flatten(1).sum(1).clamp(min=1)
    ratio = ((ga * band).flatten(1).sum(1) / n_band) / ((gb * band).flatten(1).sum(1) / n_band).clamp(min=1e-6)
    has = band.flatten(1).any(1)
    return ratio[has].numpy().astype(np.float64), int((~has).sum())


def inpainting_records(synth, real, seed: int = 0) -> list[dict]:
    s_idx, r_idx, how = pair(synth, real)
    if not s_idx:
        raise UserError("no synthetic sample could be paired with its source slice (the manifest's condition)")
    size = synth.images.shape[-1]
    ids = [synth.ids[i] for i in s_idx]
    region = sample_files(synth.root, ids, "region", size) > 0.5
    labels = sample_files(synth.root, ids, "seg", size)
    a, b = synth.images[s_idx].float(), real.images[r_idx].float()
    outside = ~region
    diff = float((a - b).abs()[outside].max()) if bool(outside.any()) else 0.0
    ratio, unscored = seam_ratios(a, b, region, region & (labels > 0))
    method = {"pairs_by": how, "region": "region.nii.gz of each sample"}
    records = [{"metric": "inpaint_outside_max_abs_diff", "value": diff, "n": len(s_idx), "ci95": None,
                "method": {**method, "what": "max |synthetic - source| outside the region"}}]
    normal = outside & (labels == 0) & (b > 0.1)                        # tissue outside the region and the lesions
    for label in sorted(int(v) for v in labels[region].unique().tolist() if v > 0):
        inside = region & (labels == label)
        has = inside.flatten(1).any(1) & normal.flatten(1).any(1)
        ratios = {}
        for which, img in (("edited", a), ("source", b)):
            mean_in = (img * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
            mean_out = (img * normal).flatten(1).sum(1) / normal.flatten(1).sum(1).clamp(min=1)
            ratios[which] = (mean_in / mean_out.clamp(min=1e-6))[has].numpy().astype(np.float64)
        v, r = ratios["edited"], ratios["source"]
        records.append({"metric": f"inpaint_contrast_{label}", "value": float(v.mean()) if len(v) else None,
                        "n": int(len(v)), "ci95": M.bootstrap_mean_ci(v, 1000, seed) if len(v) > 1 else None,
                        "real": {"value": float(r.mean()) if len(r) else None},
                        "method": {**method, "what": f"mean intensity in label {label} inside the region over normal "
                                                     "tissue outside it; real: the source slice's pixels"}})
    return records + [
        {"metric": "inpaint_seam", "value": float(ratio.mean()) if len(ratio) else None, "n": int(len(ratio)),
         "ci95": M.bootstrap_mean_ci(ratio, 1000, seed) if len(ratio) > 1 else None, "unscored": unscored,
         "method": {**method, "what": f"gradient magnitude on the region's border band farther than {LESION_EDGE} "
                                      "px from the inserted lesion, edited / source; 1 for a seamless insertion",
                    **({"unscored": f"{unscored} pair(s) whose band lies within {LESION_EDGE} px of the lesion "
                                    "(a margin of 0-1 px): a seam there cannot be told from the lesion's edge"}
                       if unscored else {})}}]
