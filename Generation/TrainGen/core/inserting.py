"""generate.py --inpaint_into DIR: insert lesions into real scans. Each sample takes one real slice (or volume)
of DIR, a lesion mask (from a seg model, or a real dataset's label maps), places it where the rules allow (inside
the brain, clear of the scan's own tumour, within the size range), and regenerates the lesion and a margin
around it: with an `inpaint` model, or RePaint (known-region replacement with resampling jumps) with any
unconditional or mask-conditioned model of the scan's sequence. Everything outside the region is the scan as
read, exactly. Each sample is written as the loaders read it (<sample>/<sequence>.nii.gz, seg.nii.gz: the
scan's own tumour and the inserted lesion, region.nii.gz: what was regenerated) with its source and placement
in the manifest; like every generation job it is resumable and sharded."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medgen.common.data import MASK_ROLE
from medgen.common.errors import UserError
from medgen.common.labels import check_not_binary, unknown_values
from medgen.Generation.TrainGen.core.generate import Job, draw, source_name
from medgen.Generation.TrainGen.core.generation.writers import IMAGE_STREAM, MASK_STREAM, sample_seed
from medgen.Generation.TrainGen.core.inpainting import compose, dilate

PLACE_STREAM = 2           # the seed stream of placements (masks 0, images 1)
REGION_ROLE = "region"     # the file of what was regenerated


@dataclass
class Scans:
    images: torch.Tensor               # (N, 1, ...) the model's sequence, in [0, 1]
    labels: torch.Tensor | None        # (N, 1, ...) the scans' own label maps (or binary masks), when they have them
    sources: list[str]                 # slice keys (NIfTI) or image files


@dataclass
class Placement:
    min_area: float = 0.0005           # lesion area (fraction of the image), and at least 4 pixels
    max_area: float = 0.25
    margin: int = 2                    # px: the regenerated region beyond the lesion, and the clearance kept from
                                       # the brain's edge and from the scan's own tumour
    attempts: int = 20                 # lesions and positions tried per sample
    overlap: bool = False              # allow the lesion over the scan's own tumour


MIN_BRAIN = 0.15           # slices whose brain covers less of the image (the top and bottom of a head) are left out:
                           # a lesion has no room there
BRAIN_LEVEL = 0.1          # the brain: the largest connected region brighter than this (normalised scan), holes filled


def brain_mask(scan: torch.Tensor) -> torch.Tensor:
    """(C, ...) scan in [0, 1] -> (1, ...) brain: the largest connected component of the tissue brighter than
    BRAIN_LEVEL, holes filled (a skull-stripped scan's brain; in a head, the brain inside the dark skull)."""
    from scipy import ndimage
    tissue = (scan.amax(0) > BRAIN_LEVEL).cpu().numpy()
    comps, n = ndimage.label(tissue)
    if n == 0:
        return torch.zeros_like(scan[:1], dtype=torch.bool)
    largest = comps == (np.bincount(comps.ravel())[1:].argmax() + 1)
    return torch.from_numpy(ndimage.binary_fill_holes(largest))[None].to(scan.device)


def read_scans(directory: str, model, skip_bad: bool = False, compute: str = "auto") -> Scans:
    """The scans of a NIfTI dataset (every split; the slices whose foreground covers MIN_BRAIN of the image) or an
    images/ + masks/ folder, read as the model's training data (its layout, size and crop), with their own masks
    where they have them."""
    scans = _read_scans(directory, model, skip_bad, compute)
    check_not_binary(scans.labels, model.mode.vocab, f"--inpaint_into {directory}")
    keep = torch.tensor([float(brain_mask(x).float().mean()) >= MIN_BRAIN for x in scans.images], dtype=torch.bool)
    idx = torch.nonzero(keep)[:, 0]
    return Scans(scans.images[idx], None if scans.labels is None else scans.labels[idx],
                 [scans.sources[i] for i in idx.tolist()])


def _read_scans(directory: str, model, skip_bad: bool, compute: str) -> Scans:
    from medgen.common import imagefolder
    from medgen.common.data import is_nifti_dataset
    from medgen.common.dataset import load_folder, scan_split
    from medgen.config.paths import PathConfig
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--inpaint_into {root}: folder does not exist")
    sequence = model.mode.generated_roles[0]
    cache = PathConfig.from_compute(compute).slice_cache
    if is_nifti_dataset(root):
        cfg = replace(model.cfg.data, data_dir=str(root), positive_only=False, format="nifti", skip_bad=skip_bad)
        data = load_folder(cfg, root, [sequence, MASK_ROLE], cache if cfg.cache else None)
        return Scans(data.images[:, :1].float(), data.masks.float(), data.slice_keys())
    if model.cfg.data.spatial_dims == 3:
        raise UserError(f"--inpaint_into {root}: a 3D model inserts into NIfTI volumes; this is an image folder")
    if not imagefolder.is_pair_folder(root):
        raise UserError(f"--inpaint_into {root}: expected a NIfTI dataset or images/ + masks/ folders")
    cfg = replace(model.cfg.data, data_dir=str(root), format="pairs", val_fraction=0.0, skip_bad=skip_bad)
    data, _, _ = scan_split(cfg, root, "train", [], cache if cfg.cache else None, "pairs", raise_fatal=True)
    return Scans(data.images[:, :1].float(), data.masks.float() if data.masks is not None else None,
                 [str(s) for s in data.sources])


def lesion_bank(directory: str, model, skip_bad: bool = False, compute: str = "auto"
                ) -> tuple[torch.Tensor, list[str]]:
    """(N, 1, ...) label maps of the lesions of a real dataset (slices with a lesion), and their keys."""
    from medgen.Generation.TrainGen.core.generation.conditions import load_real_conditions
    probe = replace(model, mode=_MasksOnly(model.mode))
    return load_real_conditions(directory, probe, skip_bad=skip_bad, compute=compute)


class _MasksOnly:
    """A view of a mode whose only condition role is the mask (to read a dataset's masks alone)."""

    def __init__(self, mode):
        self.vocab, self.condition_roles = mode.vocab, [MASK_ROLE]


def erode(mask: torch.Tensor, px: int) -> torch.Tensor:
    return 1 - dilate(1 - mask.float(), px)


def place(lesion: torch.Tensor, allowed: torch.Tensor, occupied: torch.Tensor, rng: np.random.Generator
          ) -> tuple[torch.Tensor, list[int]] | None:
    """The lesion (1, ...) moved to a position where all of it lies inside `allowed` and off `occupied` (1, ...):
    where it is when that position is valid, else one drawn uniformly from every valid position (the free area
    eroded by the lesion's own shape, one correlation); None when there is none."""
    fg = lesion[0] > 0
    where = torch.nonzero(fg)
    lo, hi = where.min(0).values.tolist(), where.max(0).values.tolist()
    kernel = fg[tuple(slice(a, b + 1) for a, b in zip(lo, hi))].float()
    free = ((allowed[0] > 0.5) & ~(occupied[0] > 0.5)).float()
    conv = F.conv2d if fg.dim() == 2 else F.conv3d
    fits = conv(free[None, None], kernel[None, None])[0, 0] >= kernel.sum() - 0.5   # top-left corners that fit
    if bool(fits[tuple(lo)]):
        origin = lo                                              # where it is: no move
    else:
        corners = torch.nonzero(fits)
        if len(corners) == 0:
            return None
        origin = corners[int(rng.integers(len(corners)))].tolist()
    shift = [o - a for o, a in zip(origin, lo)]
    return torch.roll(lesion, shifts=shift, dims=tuple(range(1, lesion.dim()))), shift


@dataclass
class Inserter:
    """Everything an insertion job needs beside the Job: the scans, where lesions come from, the rules."""
    scans: Scans
    placement: Placement
    bank: torch.Tensor | None = None           # real lesion label maps (--masks_from)
    bank_keys: list[str] | None = None
    jumps: int = 1                             # RePaint jumps (non-inpaint models)
    replace_every: bool = True
    seed: int = 0                              # the job's seed: the order of the scans
    order: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        n = len(self.scans.sources)
        self.order = np.random.default_rng([self.seed, PLACE_STREAM, n]).permutation(n)

    def scan_of(self, i: int) -> int:
        """The scan sample i edits: the scans in a seeded order (every scan once per len(scans) samples), so that a
        job of fewer samples than scans spreads over the subjects instead of taking the first ones."""
        return int(self.order[i % len(self.order)])

    def settings(self, directory: str) -> dict:
        return {"inpaint_into": str(Path(directory).resolve()), **self.placement.__dict__, "jumps": self.jumps,
                "replace_every": self.replace_every}

    def candidate(self, job: Job, i: int, attempt: int, rng: np.random.Generator):
        """(lesion, origin, why not) of attempt `attempt` for sample i: a bank entry chosen by the sample's seeded
        draw, or the seg model's mask of that attempt's seed (None with the reason when the mask filter
        rejects it)."""
        if self.bank is not None:
            k = int(rng.integers(len(self.bank)))
            return self.bank[k].to(job.device), f"mask:{source_name(self.bank_keys[k], job.anonymize_sources)}", ""
        seed = sample_seed(job.seed, i, MASK_STREAM, attempt)
        mask = job.seg_model.mode.outputs(draw(job, job.seg_model, [seed], {}))[MASK_ROLE][0]
        why = job.mask_filter.reason(mask[0].cpu().numpy(), job.seg_model.mode.vocab)
        return (None if why else mask), f"generated:seg_seed={seed}", why or ""

    def lesion_for(self, job: Job, i: int, scan: torch.Tensor, own: torch.Tensor | None):
        """(placed lesion label map, region, row fields) for sample i, or a UserError after the attempts."""
        p = self.placement
        rng = np.random.default_rng(sample_seed(job.seed, i, PLACE_STREAM))
        allowed = erode(brain_mask(scan)[None], p.margin)[0]                        # inside the brain
        occupied = (dilate((own > 0)[None], p.margin)[0] if own is not None and not p.overlap
                    else torch.zeros_like(allowed))
        pixels = scan[0].numel()
        why = "no lesion fit"
        for attempt in range(p.attempts):
            lesion, origin, rejected = self.candidate(job, i, attempt, rng)
            if lesion is None:
                why = f"generated masks rejected ({rejected})"
                continue
            area = float((lesion > 0).sum()) / pixels
            if not (p.min_area <= area <= p.max_area) or int((lesion > 0).sum()) < 4:
                why = f"lesion area {area:.4f} outside [{p.min_area}, {p.max_area}]"
                continue
            placed = place(lesion, allowed, occupied, rng)
            if placed is not None:
                moved, shift = placed
                region = dilate((moved > 0)[None], p.margin)[0]
                return moved, region, {"lesion": origin, "placement_shift": ",".join(map(str, shift)),
                                       "mask_attempts": attempt + 1}
            why = "does not fit inside the brain" + ("" if p.overlap else " clear of the scan's own tumour")
        raise UserError(f"sample {i}: no lesion could be placed in "
                        f"{source_name(self.scans.sources[self.scan_of(i)], job.anonymize_sources)} "
                        f"after --max_attempts {p.attempts} ({why}); lower --min_lesion_area/--max_lesion_area, "
                        "raise --max_attempts, or choose scans with more room")

    def batch(self, job: Job, indices: list[int]) -> dict[int, dict]:
        """{index: {'arrays', 'row'}} of inserted lesions (core/generate.py's batch format)."""
        model, mode = job.main_model, job.main_mode
        which = [self.scan_of(i) for i in indices]
        scans = torch.stack([self.scans.images[s] for s in which]).to(job.device)
        own = [self.scans.labels[s].to(job.device) if self.scans.labels is not None else None for s in which]
        placed = [self.lesion_for(job, i, scans[k], own[k]) for k, i in enumerate(indices)]
        lesion = torch.stack([p[0] for p in placed]).float()
        region = torch.stack([p[1] for p in placed]).float()
        combined = torch.stack([torch.where(lesion[k] > 0, lesion[k], own[k] if own[k] is not None else lesion[k])
                                for k in range(len(indices))])       # the scan's tumour and the inserted lesion
        if mode.needs == "inpaint":
            cond = mode.inputs(scans, region, lesion)            # carries the known pixels and the region
            known = None
        else:                            # RePaint with a mask-conditioned or unconditional model
            cond = mode.condition(combined) if mode.needs == "mask" else {}
            known = (scans * 2 - 1, region)
        seeds = [sample_seed(job.seed, i, IMAGE_STREAM) for i in indices]
        x = draw(job, model, seeds, cond, known=known, jumps=self.jumps, replace_every=self.replace_every)
        image = compose(mode.outputs(x)[mode.generated_roles[0]], scans, region)
        out = {}
        for k, i in enumerate(indices):
            row = {"condition": source_name(self.scans.sources[which[k]], job.anonymize_sources), **placed[k][2]}
            out[i] = {"arrays": {mode.generated_roles[0]: image[k].cpu(), MASK_ROLE: combined[k].cpu(),
                                 REGION_ROLE: region[k].cpu()}, "row": row}
        return out


def check_scans(scans: Scans, model, directory: str) -> None:
    """Scans the model can read: labels of its vocabulary, a brain to place lesions in."""
    if scans.labels is not None:
        bad = unknown_values(scans.labels.numpy(), model.mode.vocab)
        if bad:
            raise UserError(f"--inpaint_into {directory}: masks hold {bad[:5]}, not labels of "
                            f"{model.mode.vocab.describe()}")
    if len(scans.sources) == 0:
        raise UserError(f"--inpaint_into {directory}: no scan whose brain covers {MIN_BRAIN:.0%} of the image to "
                        "insert lesions into")
