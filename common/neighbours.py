"""Nearest neighbours by pixel correlation: the memorization audit (eval) and generate.py --reject_copies
share one definition of "close to a training image"."""
from __future__ import annotations

import numpy as np
import torch


def unit_rows(images: torch.Tensor) -> torch.Tensor:
    """Each image flattened, centred and scaled to unit norm (float64): for two such rows a, b,
    |a - b| = sqrt(2 - 2 r) with r their Pearson correlation."""
    x = images.flatten(1).double()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest(query: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query row's nearest ref row by Euclidean distance (rows as given)."""
    dist, idx = [], []
    ref_sq = (ref ** 2).sum(1)
    for i in range(0, len(query), chunk):
        q = query[i:i + chunk]
        d2 = (q ** 2).sum(1, keepdim=True) + ref_sq[None] - 2 * q @ ref.T
        m, j = d2.clamp_min(0).min(1)
        dist.append(m.sqrt())
        idx.append(j)
    if not dist:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy()
