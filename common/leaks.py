"""Held-out subjects that are copies of training subjects, found by their content rather than their names.

A name check (common/splits.py) misses the realistic leaks: a data release that gives old subjects new ids (BraTS
2023 re-releases 2021 subjects), a hospital export that renames folders, a symlink, a copy under another letter
case. Each slice is reduced to a fingerprint (its mean over blocks of a FINGERPRINT x FINGERPRINT grid, after the
same preprocessing as every split) and matched to its nearest training fingerprint; a held-out subject whose
informative slices mostly lie within MATCH_RMS of one training subject's is a copy of it. Slices with almost no
contrast (background, the first and last slices of a volume) are left out: they look alike in every subject.

What counts: an RMS difference of at most MATCH_RMS (intensities in [0, 1]) on the fingerprint, i.e. the same
voxels up to resaving and rounding. The closest slices of two different subjects differ by 4x that in the demo
phantoms (0.013; their median 0.075), whose subjects are drawn from one smooth template, and by more in scans.
Not found: a copy moved, flipped, cropped or resampled onto another grid (the copy detector of the memorization
audit, common/neighbours.py, measures those), and one patient split into two units (slices of a patient's
different files: group the units by patient instead).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medgen.common.neighbours import nearest

FINGERPRINT = 16        # blocks per in-plane axis (and per depth, up to 8, for volumes)
MATCH_RMS = 0.003       # fingerprint RMS difference of a copy, intensity units of [0, 1] images
MIN_CONTRAST = 0.02     # fingerprints with a smaller standard deviation are background, never matched
MIN_SHARE = 0.5         # of a held-out subject's informative slices that must match one training subject


@dataclass(frozen=True)
class Copy:
    unit: str           # the held-out unit
    source: str         # the training unit it copies
    matched: int        # its informative slices matching the source
    informative: int    # its informative slices


def fingerprints(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (N, C, D, H, W) -> (N, K) float32 block means, scaled so that the Euclidean distance of two
    rows is their RMS difference."""
    x = images.float()
    if x.dim() == 5:
        size = (min(8, x.shape[2]), min(FINGERPRINT, x.shape[3]), min(FINGERPRINT, x.shape[4]))
        rows = F.adaptive_avg_pool3d(x, size).flatten(1)
    else:
        size = (min(FINGERPRINT, x.shape[-2]), min(FINGERPRINT, x.shape[-1]))
        rows = F.adaptive_avg_pool2d(x, size).flatten(1)
    return rows / rows.shape[1] ** 0.5


def find_copies(train_images: torch.Tensor, train_units: list[str], held_images: torch.Tensor,
                held_units: list[str], chunk: int = 4096) -> list[Copy]:
    """The held-out units that copy a training unit (module docstring), in held-out order."""
    if len(train_images) == 0 or len(held_images) == 0:
        return []
    ref, query = fingerprints(train_images), fingerprints(held_images)
    scale = ref.shape[1] ** 0.5                               # row std of a fingerprint, in intensity units
    ref_ok = (ref.std(1) * scale >= MIN_CONTRAST).numpy()
    query_ok = (query.std(1) * scale >= MIN_CONTRAST).numpy()
    if not ref_ok.any() or not query_ok.any():
        return []
    ref_index = np.flatnonzero(ref_ok)
    dist, j = nearest(query[query_ok], ref[ref_ok], chunk)
    source = np.asarray(train_units, dtype=object)[ref_index[j]]
    held = np.asarray(held_units, dtype=object)[query_ok]
    copies = []
    for unit in dict.fromkeys(held_units):
        mine = held == unit
        n = int(mine.sum())
        if n == 0:
            continue
        close = mine & (dist <= MATCH_RMS)
        if not close.any():
            continue
        names, counts = np.unique(source[close], return_counts=True)
        best = int(np.argmax(counts))
        if counts[best] >= max(1, MIN_SHARE * n):
            copies.append(Copy(unit, str(names[best]), int(counts[best]), n))
    return copies
