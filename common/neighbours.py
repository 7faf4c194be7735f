"""Nearest training images, and what counts as "close": the memorization audit (eval) and generate.py
--reject_copies share one definition.

The copy distance of a query image to a training image is the smallest correlation distance sqrt(2 - 2 r)
(r: Pearson correlation) between the training image's centre window and the query's windows moved by up to
SHIFT_PX pixels along each in-plane axis, of the query and of its left-right mirror. It is 0 for an exact copy,
for a copy moved by up to SHIFT_PX pixels, for a mirrored copy, and for any brightness/contrast change of those
(correlation ignores both). It does not see rotations, rescaling, elastic warps, larger moves or a copied part
of an image: those need the feature-space section of the audit, or a look at the closest pairs.
"""
from __future__ import annotations

import numpy as np
import torch

SHIFT_PX = 2
TOLERANCE = f"moves of up to {SHIFT_PX} px and left-right mirroring"
DETECTS = (f"exact copies, copies moved by up to {SHIFT_PX} px, mirrored copies, and brightness or contrast "
           "changes of those")
MISSES = "rotations, rescaling, elastic deformations, larger moves, and copies of part of an image"


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
    return torch.cat(dist).cpu().numpy(), torch.cat(idx).cpu().numpy()


def _window(images: torch.Tensor, s: int, dy: int = 0, dx: int = 0) -> torch.Tensor:
    h, w = images.shape[-2:]
    return images[..., s + dy:h - s + dy, s + dx:w - s + dx]


class CopyIndex:
    """Training images, ready for copy_distance queries of images of the same size."""

    def __init__(self, train: torch.Tensor, device=None):
        self.shape = tuple(train.shape[1:])
        self.shift = min(SHIFT_PX, min(train.shape[-2:]) // 8)    # small images keep most of their window
        self.rows = unit_rows(_window(train.to(device) if device is not None else train, self.shift))

    def __len__(self) -> int:
        return len(self.rows)

    def query(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(copy distance, index of the nearest training image) of each image: the minimum over mirroring
        and moves (module docstring)."""
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} against training images {self.shape}")
        s, images = self.shift, images.to(self.rows.device)
        best = np.full(len(images), np.inf)
        where = np.zeros(len(images), dtype=np.int64)
        for q in (images, images.flip(-1)):
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):
                    d, j = nearest(unit_rows(_window(q, s, dy, dx)), self.rows)
                    better = d < best
                    best[better], where[better] = d[better], j[better]
        return best, where


def order_threshold(heldout: np.ndarray, q: float) -> tuple[float, int]:
    """(the k-th smallest held-out distance, k) with k = round(q (n + 1)), at least 1. A distance drawn like
    the held-out ones falls below it with probability exactly k / (n + 1) (an order statistic of n
    exchangeable values), which is q only when n is large: with 22 held-out images it is 1/23, 4.3%."""
    n = len(heldout)
    k = int(min(n, max(1, round(q * (n + 1)))))
    return float(np.sort(heldout)[k - 1]), k
