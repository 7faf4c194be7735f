"""Nearest training images, and what counts as "close": the memorization audit (eval) and generate.py
--reject_copies share one definition.

The copy distance of a query image to a training image is sqrt(2 - 2 r), r the largest normalised
cross-correlation (the Pearson correlation of two overlapping windows) found over
- every move of up to 1/8 of the side (8 px at 64 px) along each in-plane axis,
- the query as it is, mirrored left-right, flipped up-down, and both (a 180-degree turn),
- every crop of 80% of the side or more, resized back, of either image inside the other: the smaller of
  the two (resized to the crop's size) slides over every position of the larger,
both images first blurred by a Gaussian of SMOOTH px per 64 px (so that a crop between two searched sizes,
or a resampling, still matches). It is 0 for an exact copy and for each of those transforms of it, whatever
the brightness and contrast (the correlation ignores both); small rotations, noise and blur raise it a
little. Searching every training image that way is too slow, so each query's CANDIDATES nearest training
images by a descriptor that moves and flips leave unchanged (the folded low-frequency magnitude spectrum, at
the SCALES crops) are searched exactly: in float32 to find the closest, whose distance is then computed in
float64. `bench/benchmark.py --suite copies` measures what it flags on the demo phantoms (the table in
docs/utility.md).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCALES = (0.8, 0.85, 0.9, 0.95)         # descriptor crops; the exact search tries every crop size down to 0.8
CANDIDATES = 8                          # training images per query searched exactly
SMOOTH = 1.0                            # px at 64 px (scaled with the side): both images blurred first
SPECTRUM = 8                            # low frequencies of the descriptor, per axis
TOLERANCE = "moves of up to 1/8 of the side, flips either way, and crops or zooms of 0.8-1.25 resized back"
DETECTS = ("exact copies, copies moved by up to 1/8 of the side, flipped left-right or up-down, cropped to 80% "
           "or more and resized (or shrunk and padded), with any brightness or contrast change, and, on the demo "
           "phantoms, rotations of up to 5 degrees, gamma changes, noise of 10% of the range and a 1-pixel blur")
MISSES = ("rotations of 10 degrees or more (62% flagged at 10 degrees on the phantoms), elastic deformations, "
          "larger moves or zooms, and copies of part of an image")


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


def flips(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H, W): as is, mirrored left-right, flipped up-down, both."""
    return torch.stack([x, x.flip(-1), x.flip(-2), x.flip(-1, -2)], 1)


def rescale(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., C, H, W) resized to size x size (bilinear; anti-aliased when shrinking)."""
    lead = x.shape[:-3]
    y = x.reshape(-1, *x.shape[-3:])
    y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return y.reshape(*lead, *y.shape[-3:])


def crop(x: torch.Tensor, frac: float) -> torch.Tensor:
    """The centre frac of the side."""
    n = x.shape[-1]
    c = max(1, int(round(n * frac)))
    o = (n - c) // 2
    return x[..., o:o + c, o:o + c]


def smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., C, H, W) blurred in-plane by a Gaussian of sigma px (zero outside the image)."""
    if sigma <= 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    y = x.reshape(-1, 1, *x.shape[-2:])
    y = F.conv2d(F.conv2d(y, k.view(1, 1, -1, 1), padding=(r, 0)), k.view(1, 1, 1, -1), padding=(0, r))
    return y.reshape(x.shape)


def window(x: torch.Tensor, m: int) -> torch.Tensor:
    return x[..., m:x.shape[-2] - m, m:x.shape[-1] - m] if m else x


class Search:
    """Images that templates slide over: their spectrum and integral images, computed once."""

    def __init__(self, images: torch.Tensor):
        """images (..., C, N, N)."""
        self.n, self.channels = images.shape[-1], images.shape[-3]
        self.spectrum = torch.fft.rfft2(images)
        self.ii = F.pad(images.sum(-3).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        self.ii2 = F.pad(images.square().sum(-3).cumsum(-1).cumsum(-2), (1, 0, 1, 0))

    def best(self, tmpl: torch.Tensor) -> torch.Tensor:
        """Largest normalised cross-correlation of each template (..., C, h, w), broadcast against the images,
        over every position where it lies inside the image; 0 where either side is flat."""
        n, h, w = self.n, tmpl.shape[-2], tmpl.shape[-1]
        t = tmpl - tmpl.mean((-3, -2, -1), keepdim=True)
        t_norm = t.square().sum((-3, -2, -1))
        t = t / t_norm.sqrt().clamp_min(1e-30)[..., None, None, None]
        corr = torch.fft.irfft2((self.spectrum * torch.fft.rfft2(t, s=(n, n)).conj()).sum(-3), s=(n, n))
        corr = corr[..., :n - h + 1, :n - w + 1]
        box = lambda a: a[..., h:, w:] - a[..., :-h, w:] - a[..., h:, :-w] + a[..., :-h, :-w]  # noqa: E731
        count = self.channels * h * w
        var = (box(self.ii2) - box(self.ii).square() / count).clamp_min(0)     # of each window, times count
        flat = (var <= 1e-12 * count) | (t_norm <= 1e-12 * count)[..., None, None]
        r = torch.where(flat, torch.zeros_like(corr), corr / var.sqrt().clamp_min(1e-30))
        return r.clamp(-1, 1).flatten(-2).max(-1).values


def descriptors(x: torch.Tensor, frac: float) -> torch.Tensor:
    """The candidate descriptor of each (B, C, N, N) image's centre frac: the log magnitude of its low
    frequencies, folded so that moves (which change only phases) and flips (which mirror the spectrum) leave
    it as it is, centred and of unit norm (float32)."""
    x = rescale(crop(x, frac), 32).double()
    x = x - x.mean((-2, -1), keepdim=True)
    x = x / x.flatten(1).std(1).clamp_min(1e-12)[:, None, None, None]
    m = torch.fft.rfft2(x).abs()
    k = SPECTRUM
    m = m[..., :k + 1] if m.shape[-1] > k else m
    lo = torch.cat([m[..., :k + 1, :], m[..., -k:, :]], -2)                # ky = 0..k, -k..-1
    folded = torch.cat([lo[..., :1, :], lo[..., 1:k + 1, :] + lo[..., k + 1:, :].flip(-2)], -2)   # ky ~ -ky
    d = torch.log1p(folded).flatten(1)
    d = d - d.mean(1, keepdim=True)
    return (d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()


class CopyIndex:
    """Training images, ready for copy_distance queries of images of the same size."""

    def __init__(self, train: torch.Tensor, device=None):
        self.shape = tuple(train.shape[1:])
        n = train.shape[-1]
        if train.shape[-2] != n:
            raise ValueError(f"copy distance: square images only, got {tuple(train.shape[-2:])}")
        self.sigma = SMOOTH * n / 64
        self.train = train.reshape(len(train), -1, n, n).to(device if device is not None else train.device)
        self.margin = n // 8                 # moves searched: up to 1/8 of the side along each axis
        self.fracs = [1.0] + [f for f in SCALES if int(round(n * f)) > 2 * self.margin + 1]
        step = max(1, round(n / 64))         # every crop size, in steps of the blur's width
        self.sizes = [c for c in range(n - step, int(min(SCALES) * n) - 1, -step) if c > 2 * self.margin + 1]
        self.desc = torch.stack([descriptors(self.train, f) for f in self.fracs])      # (S, n_train, D)
        self.train = smooth(self.train.float(), self.sigma)

    def __len__(self) -> int:
        return len(self.train)

    def candidates(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K) indices of each query's CANDIDATES closest training images by descriptor, over the scales."""
        k = min(CANDIDATES, len(self.train))
        if k == len(self.train):
            return torch.arange(k).expand(len(images), k)
        q = torch.stack([descriptors(images, f) for f in self.fracs])              # (S, B, D)
        score = q[0] @ self.desc[0].T
        for s in range(1, len(self.fracs)):     # the query a crop of the training image, and the reverse
            score = torch.maximum(score, torch.maximum(q[0] @ self.desc[s].T, q[s] @ self.desc[0].T))
        return score.topk(k, dim=1).indices

    def distances(self, images: torch.Tensor, cand: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """(B, K) copy distance of each query to each of its candidates: the exact search of the module
        docstring."""
        q = images.to(dtype)
        r = self.train[cand].to(dtype)                                  # (B, K, C, N, N)
        qf = flips(q)                                                   # (B, 4, C, N, N)
        in_train, in_query = Search(r[:, None]), Search(qf[:, :, None])
        best = in_train.best(window(qf, self.margin)[:, :, None]).amax(1)                    # moves
        for size in self.sizes:
            t = window(rescale(qf, size), 1)                             # the query a crop of the training image
            best = torch.maximum(best, in_train.best(t[:, :, None]).amax(1))
            t = window(rescale(r, size), 1)                              # the training image a crop of the query
            best = torch.maximum(best, in_query.best(t[:, None]).amax(1))
        return (2 - 2 * best).clamp_min(0).sqrt()

    def query(self, images: torch.Tensor, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(copy distance, index of the nearest training image) of each image (module docstring)."""
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} against training images {self.shape}")
        images = images.reshape(len(images), *self.train.shape[1:]).to(self.train.device)
        dist, where = [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
        for i in range(0, len(images), chunk):
            q = images[i:i + chunk]
            cand = self.candidates(q).to(q.device)
            q = smooth(q.float(), self.sigma)
            # the closest candidate by a float32 search, its distance by a float64 one (a copy's is ~1e-8)
            j = cand.gather(1, self.distances(q, cand, torch.float32).argmin(1, keepdim=True))
            dist.append(self.distances(q, j)[:, 0].cpu().numpy())
            where.append(j[:, 0].cpu().numpy())
        return np.concatenate(dist), np.concatenate(where)


def order_threshold(heldout: np.ndarray, q: float) -> tuple[float, int]:
    """(the k-th smallest held-out distance, k) with k = round(q (n + 1)), at least 1. A distance drawn like
    the held-out ones falls below it with probability exactly k / (n + 1) (an order statistic of n
    exchangeable values), which is q only when n is large: with 22 held-out images it is 1/23, 4.3%."""
    n = len(heldout)
    k = int(min(n, max(1, round(q * (n + 1)))))
    return float(np.sort(heldout)[k - 1]), k
