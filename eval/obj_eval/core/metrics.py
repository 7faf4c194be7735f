"""The metrics, each computed the standard way and returned with what is needed to read it: value, N, 95%
bootstrap interval and the method details.

FID      Frechet distance between Gaussians fitted (float64) to feature sets; tr sqrt(S1 S2) is computed as
         sum sqrt(eig(A S2 A)) with A = S1^(1/2) (symmetric, no complex round-off). The interval is for the FID
         this pipeline gives at this N (its mean over fresh synthetic sets of the same size, real set fixed):
         resampling with replacement duplicates rows, which alone raises FID (the finite-N bias), so the
         bootstrap distribution is re-centred on the value before its percentiles are read (`fid_interval`).
LPIPS    mean over pairs (quality: synthetic vs its real slice; diversity: distinct synthetic samples).
         Diversity pairs share samples, so their interval resamples samples, not pairs (`pairwise_mean_ci`).
MS-SSIM  Wang et al. 2003 with a Gaussian window (sigma 1.5), valid convolution, avg-pool 2 between scales,
         ReLU-clipped cs at every scale but the last and SSIM at the last (MONAI's definition); the window and
         the number of scales are chosen to fit the image (7 px and 5 scales at 128 px) and reported.
MAE/PSNR on pairs, with an explicit data range; PSNR per pair (10 log10(range^2 / MSE), at most 100 dB for
         identical pairs), then averaged.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
FID_MIN_N = 2048
FID_MIN_VOLUMES = 100   # 2.5D FID: volumes below which the report warns


# ---------------------------------------------------------------- statistics
def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, groups=None) -> list[float] | None:
    """Percentile interval of the mean. `groups`: the unit of each value (a subject's slices); units are
    resampled whole, since values of one unit are not independent (None when there are fewer than 2 units)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    if groups is None:
        means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    else:
        members = unit_members(groups)
        if len(members) < 2:
            return None
        means = np.array([values[cluster_resample(rng, members, len(values))].mean() for _ in range(n_boot)])
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summary(values, name: str, method: dict, seed: int = 0, pairs: tuple | None = None, **extra) -> dict:
    """A record of a mean with its 95% interval: over independent values, or with pairs=(i, j, n_samples) over
    sample pairs (diversity), where samples are resampled, not pairs."""
    values = np.asarray(values, dtype=np.float64)
    ci = bootstrap_mean_ci(values, seed=seed) if pairs is None else pairwise_mean_ci(*pairs[:2], values, pairs[2],
                                                                                   seed=seed)
    return {"metric": name, "value": float(values.mean()) if len(values) else None, "n": int(len(values)),
            "ci95": ci, "std": float(values.std()) if len(values) else None, "method": method, **extra}


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma1: np.ndarray | None = None) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64."""
    a = _sqrt_psd(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    m = a @ sigma2 @ a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


FID_CI_METHOD = ("bootstrap over synthetic samples (real statistics fixed), re-centred on the value: "
                 "percentiles of FID* - (mean FID* - FID); covers the FID expected at this N")


def fid_interval(boots, value: float) -> tuple[list[float], float]:
    """(95% interval, resampling bias) from bootstrap FIDs. Drawing N rows with replacement repeats rows, which
    shrinks the effective sample and raises FID by about the finite-N bias; the raw percentiles then lie above
    the value. Removing that shift (mean FID* - FID) leaves the spread, which is what a fresh synthetic set of
    the same size varies by."""
    boots = np.asarray(boots, np.float64)
    bias = float(boots.mean() - value)
    lo, hi = np.percentile(boots - bias, [2.5, 97.5])
    return [float(lo), float(hi)], bias


def frechet_from_samples(real: np.ndarray, synthetic: np.ndarray) -> float:
    """The Fréchet distance of two feature sets with fewer samples than dimensions, without a d x d matrix root.
    With centred rows A1, A2 and S_k = A_k^T A_k / (n_k - 1), the non-zero eigenvalues of S1 S2 are those of
    (A1 A2^T)(A1 A2^T)^T / ((n1 - 1)(n2 - 1)), so tr sqrt(S1 S2) is the sum of the singular values of the
    n1 x n2 matrix A1 A2^T over sqrt((n1 - 1)(n2 - 1)): exact, and O(n1 n2 d) instead of O(d^3)."""
    r, s = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    a1, a2 = r - r.mean(0), s - s.mean(0)
    n1, n2 = len(r) - 1, len(s) - 1
    tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    diff = r.mean(0) - s.mean(0)
    return float(diff @ diff + np.square(a1).sum() / n1 + np.square(a2).sum() / n2 - 2 * tr_sqrt)


def unit_members(groups) -> list[np.ndarray]:
    """The row indices of each unit (a volume's slices, a subject's images), units in sorted order."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def cluster_resample(rng, members: list[np.ndarray] | None, n: int) -> np.ndarray:
    """Row indices of one bootstrap resample: n rows with replacement, or, with members (unit_members: the
    rows of each unit), whole units with replacement, all rows of each drawn unit together."""
    if members is None:
        return rng.integers(0, n, n)
    return np.concatenate([members[u] for u in rng.integers(0, len(members), len(members))])


def fid_from_features(real: np.ndarray, synthetic: np.ndarray, n_boot: int = 50, seed: int = 0,
                      groups=None, real_groups=None) -> dict:
    """FID with a bootstrap interval; sets smaller than the feature dimension take the exact sample form
    (frechet_from_samples), which is many times faster there. `groups`: the unit of each synthetic row (the
    volume of a slice); units are resampled whole, since the slices of one volume are not independent.
    `real_groups`: the real rows are a sample too (held-out slices of a few subjects): each resample also draws
    the real units, whole; without it the real statistics are held fixed."""
    members = None if groups is None else unit_members(groups)
    real_members = None if real_groups is None else unit_members(real_groups)
    if max(len(real), len(synthetic)) < real.shape[1]:
        def distance(syn, ref=None):
            return frechet_from_samples(real if ref is None else ref, syn)
    else:
        mu_r, s_r = gaussian_stats(real)
        a = _sqrt_psd(s_r)

        def distance(syn, ref=None):
            if ref is None:
                return frechet_distance(mu_r, s_r, *gaussian_stats(syn), a)
            return frechet_distance(*gaussian_stats(ref), *gaussian_stats(syn))
    value = distance(synthetic)
    out = {"value": value, "ci95": None, "n": {"real": int(len(real)), "synthetic": int(len(synthetic))}}
    n_units = len(synthetic) if members is None else len(members)
    if n_boot > 1 and n_units > 1 and (real_members is None or len(real_members) > 1):
        rng = np.random.default_rng(seed)
        boots = []
        for _ in tqdm(range(n_boot), desc="FID bootstrap", leave=False, disable=n_boot < 20):
            syn = synthetic[cluster_resample(rng, members, len(synthetic))]
            ref = None if real_members is None else real[cluster_resample(rng, real_members, len(real))]
            boots.append(distance(syn, ref))
        out["ci95"], out["resampling_bias"] = fid_interval(boots, value)
    return out


KID_MAX_N = 4000   # rows per set in the kernel matrices (a random subset beyond; the record says so)


def _group_index(groups, n: int) -> tuple[np.ndarray, int]:
    if groups is None:
        return np.arange(n), n
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    return inverse, int(inverse.max()) + 1


def kid_from_features(real: np.ndarray, synthetic: np.ndarray, seed: int = 0, groups=None, real_groups=None,
                      max_n: int = KID_MAX_N) -> dict:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased estimate of the squared MMD with the
    cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, on the whole sets (not averaged over subsets), with its
    standard error by the two-sample jackknife (one unit of either set left out at a time; Arvesen 1969 for
    U-statistics). Unbiased at any N, so unlike FID it compares sets of different sizes, and it is still
    defined below the feature dimension. `groups` / `real_groups`: the unit of each row (a volume's slices
    are left out together)."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    gx, gy = (None if g is None else np.asarray(g) for g in (real_groups, groups))
    subset = max(len(x), len(y)) > max_n
    if len(x) > max_n:
        keep = np.sort(rng.choice(len(x), max_n, replace=False))
        x, gx = x[keep], None if gx is None else gx[keep]
    if len(y) > max_n:
        keep = np.sort(rng.choice(len(y), max_n, replace=False))
        y, gy = y[keep], None if gy is None else gy[keep]
    m, n, d = len(x), len(y), x.shape[1]
    if min(m, n) < 2:
        return {"value": None, "se": None, "n": {"real": m, "synthetic": n}}
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    np.fill_diagonal(kxx, 0)
    np.fill_diagonal(kyy, 0)

    def value(sxx, m_, syy, n_, sxy):
        return sxx / (m_ * (m_ - 1)) + syy / (n_ * (n_ - 1)) - 2 * sxy / (m_ * n_)
    sxx, syy, sxy = kxx.sum(), kyy.sum(), kxy.sum()
    est = value(sxx, m, syy, n, sxy)
    # leave one unit out: its rows' off-diagonal sums (counted twice) minus its own block, and its cross terms
    var = 0.0
    for k, (gram, cross, groups_, size) in enumerate(((kxx, kxy.sum(1), gx, m), (kyy, kxy.sum(0), gy, n))):
        unit, n_units = _group_index(groups_, size)
        if n_units < 2:
            return {"value": float(est), "se": None, "n": {"real": m, "synthetic": n}}
        rows = np.bincount(unit, gram.sum(1), n_units)
        own = np.array([gram[np.ix_(unit == u, unit == u)].sum() for u in range(n_units)]) if groups_ is not None \
            else np.zeros(n_units)
        counts = np.bincount(unit, minlength=n_units)
        left = size - counts
        loo = np.bincount(unit, cross, n_units)
        if k == 0:
            thetas = value(sxx - 2 * rows + own, left, syy, n, sxy - loo)
        else:
            thetas = value(sxx, m, syy - 2 * rows + own, left, sxy - loo)
        var += (n_units - 1) / n_units * np.square(thetas - thetas.mean()).sum()
    return {"value": float(est), "se": float(np.sqrt(var)), "n": {"real": m, "synthetic": n},
            "method": "unbiased squared MMD, cubic polynomial kernel (x.y/d + 1)^3, whole sets"
                      + (f" (random subsets of {max_n} rows)" if subset else "")
                      + "; standard error: two-sample jackknife" + (" by unit (a volume's or a subject's rows together)"
                                                                  if gx is not None or gy is not None else "")}


def kid_record(name: str, kid: dict, method: dict) -> dict:
    """A KID record for the reports: kid_from_features' value and standard error, CI = value +- 1.96 SE."""
    se = kid.get("se")
    ci = [kid["value"] - 1.96 * se, kid["value"] + 1.96 * se] if se is not None else None
    return {"metric": name, "value": kid["value"], "se": se, "ci95": ci, "n": kid["n"],
            "method": {**method, "ci": "value +- 1.96 standard errors" if ci else "none"}}


def small_n_warning(n_real: int, n_synthetic: int, dim: int, volumes: int | None = None,
                    real_volumes: int | None = None) -> str | None:
    """What a Fréchet distance at this N can and cannot be compared with, or None when N is large enough."""
    n_min = min(n_real, n_synthetic)
    parts = []
    if volumes is not None and min(volumes, real_volumes or volumes) < FID_MIN_VOLUMES:
        parts.append(f"{volumes} synthetic and {real_volumes} real volumes (the slices of one volume are not "
                     f"independent, so the interval rests on the volumes; at least {FID_MIN_VOLUMES} advised)")
    if n_min < dim:
        parts.append(f"N = {n_min} < {dim} feature dimensions: the covariance is rank-deficient and FD is biased "
                     "upwards by an amount that depends on N; compare only at equal N, or use KID")
    elif n_min < FID_MIN_N:
        parts.append(f"N = {n_min} < {FID_MIN_N}: FID is biased upwards at small N; compare only at equal N")
    return "; ".join(parts) or None


# ---------------------------------------------------------------- batched network passes
def device_of(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


@torch.no_grad()
def extract_features(net, images: torch.Tensor, device, batch_size: int = 64, desc: str = "features") -> np.ndarray:
    net = net.to(device)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=len(images) <= batch_size):
        out.append(net(images[i:i + batch_size].to(device, torch.float32)).double().cpu())
    return torch.cat(out).numpy()


def content_key(images: torch.Tensor, *parts: str) -> str:
    h = hashlib.sha256(images.contiguous().numpy().tobytes())
    for p in parts:
        h.update(str(p).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def pair_distances(fn, a: torch.Tensor, b: torch.Tensor, device, batch_size: int = 64) -> np.ndarray:
    """fn(a_batch, b_batch) -> (B,) for aligned pairs, batched on device."""
    out = []
    for i in range(0, len(a), batch_size):
        out.append(fn(a[i:i + batch_size].to(device).float(), b[i:i + batch_size].to(device).float()).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def diversity_pairs(n: int, max_pairs: int, seed: int, groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i != j) of distinct samples: all of them when few, else max_pairs drawn at random; with
    groups, only pairs inside the same group."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        members: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        pairs = [(a, b) for idx in members.values() if len(idx) > 1 for k, a in enumerate(idx) for b in idx[k + 1:]]
        if len(pairs) > max_pairs:
            pairs = [pairs[k] for k in rng.choice(len(pairs), max_pairs, replace=False)]
        arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, 1)
        return i, j
    i = rng.integers(0, n, max_pairs)
    j = (i + rng.integers(1, n, max_pairs)) % n
    return i, j


def pairwise_mean_ci(i: np.ndarray, j: np.ndarray, values: np.ndarray, n: int, n_boot: int = 1000,
                     seed: int = 0) -> list[float] | None:
    """95% interval of a mean over sample pairs (a U-statistic). Pairs that share a sample are not independent,
    so samples are resampled (multinomial counts w) and each pair (i, j) is weighted by w_i * w_j: the
    bootstrap of the samples, with the pairs formed among the drawn ones (a pair of a sample with its own
    copy is never formed). Resampling pairs instead ignores the sharing and is several times too narrow."""
    i, j, values = np.asarray(i), np.asarray(j), np.asarray(values, np.float64)
    used = np.unique(np.concatenate([i, j]))
    if len(values) < 2 or len(used) < 3:
        return None
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, n))
    w[:, used] = rng.multinomial(len(used), np.full(len(used), 1 / len(used)), size=n_boot)
    pw = w[:, i] * w[:, j]
    total = pw.sum(1)
    ok = total > 0
    means = (pw[ok] @ values) / total[ok]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


# ---------------------------------------------------------------- MS-SSIM
def ms_ssim_settings(size: int) -> tuple[int, tuple[float, ...]]:
    """(window, weights) fitting a size-px image: the most scales (up to 5) that leave a window of at least 7
    px that fits the coarsest scale (window at most 11, odd); weights are the first scales' standard weights,
    renormalised. 128 px -> window 7, 5 scales; 64 px -> 7, 4 scales; 20 px -> 9, 2 scales; 8 px -> 7, 1."""
    for scales in range(5, 0, -1):
        div = max(1, scales - 1) ** 2  # MONAI's size check uses (scales - 1)^2
        limit = min(11, size // div, size // 2 ** (scales - 1))  # the window must fit the coarsest image
        window = limit if limit % 2 else limit - 1
        if window >= 7 or scales == 1:
            if window < 3:
                raise ValueError(f"images of {size} px are too small for MS-SSIM")
            w = np.array(MS_SSIM_WEIGHTS[:scales])
            return int(window), tuple(float(x) for x in w / w.sum())
    raise AssertionError


def _gauss(window: int, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_and_cs(x, y, window: int, data_range: float, k1=0.01, k2=0.03):
    """Per-sample SSIM and contrast-structure of (B, C, H, W) images or (B, C, D, H, W) volumes (separable
    Gaussian window along every spatial axis, valid region only)."""
    c, dims = x.shape[1], x.dim() - 2
    g = _gauss(window).to(x)
    conv = F.conv2d if dims == 2 else F.conv3d
    kernels = [g.view(1, 1, *[-1 if k == axis else 1 for k in range(dims)]).repeat(c, *[1] * (dims + 1))
               for axis in range(dims)]

    def filt(z):
        for k in kernels:
            z = conv(z, k, groups=c)
        return z
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int | None = None,
            weights: tuple[float, ...] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) MS-SSIM of aligned image (or volume) batches, computed in float32 (float64 is a slow path on most
    GPUs; the two agree to about 1e-6, a test pins it)."""
    if window is None or weights is None:
        window, weights = ms_ssim_settings(min(x.shape[2:]))
    x, y = x.to(dtype), y.to(dtype)
    pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
    levels = []
    for i, _ in enumerate(weights):
        ssim, cs = ssim_and_cs(x, y, window, data_range)
        levels.append(torch.relu(ssim if i == len(weights) - 1 else cs))
        if i < len(weights) - 1:
            x, y = pool(x, 2), pool(y, 2)
    w = torch.tensor(weights, dtype=torch.float64, device=x.device).view(-1, 1)
    return torch.prod(torch.stack(levels).double() ** w, 0)


# ---------------------------------------------------------------- pixel metrics
def mae(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs().flatten(1).mean(1)


PSNR_CAP_DB = 100.0  # identical pairs (MSE 0) score this instead of infinity, so they count in the mean


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=data_range ** 2 * 10 ** (-PSNR_CAP_DB / 10)))

