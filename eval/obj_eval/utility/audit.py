"""Checks of a synthetic set that use a downstream network trained on the real training data.

* faithfulness: does a synthetic image show the mask it was conditioned on? The real-data segmenter segments
  it; Dice against the conditioning mask (the mask file generate.py wrote beside the image), overall and per
  tumour-size bin, next to the same segmenter's Dice on real test images (the ceiling).
* memorization: is a synthetic image a copy of a training image? Its nearest training neighbour, by copy
  distance (pixel correlation, searched over moves, flips and crops: common/neighbours.py) and by distance in
  the downstream feature space, compared with the nearest-neighbour distances of real held-out images to the
  same training set. Without copying the fraction of synthetic images below the held-out q-th order statistic
  follows a known beta-binomial law (below_threshold): its mean is k / (n + 1) for n held-out images, about q
  only when n is large.
* domain: Fréchet distance and precision / recall / density / coverage (Naeem et al. 2020, k nearest
  neighbours) in the downstream feature space, against the real held-out images (the network saw the
  training images, whose features it has fitted).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import stats

from medgen.common.neighbours import DETECTS, MISSES, TOLERANCE, CopyIndex, nearest, order_threshold
from medgen.eval.obj_eval.core import metrics as M
from medgen.eval.obj_eval.utility import models
from medgen.common.overlap import dice

LOW_DICE = 0.5                      # faithfulness: samples listed by id below this Dice
SIZE_BINS = ("small", "medium", "large")


def _mean_ci(values: np.ndarray, seed: int, units: np.ndarray) -> dict:
    """Mean with a 95% interval that resamples units (subjects) whole: slices of one subject are not
    independent. Fewer than 2 units: no interval."""
    return {"mean": float(values.mean()) if len(values) else None, "n": int(len(values)),
            "n_units": int(len(set(units.tolist()))),
            "ci95": M.bootstrap_mean_ci(values, 1000, seed, units) if len(values) > 1 else None}


def faithfulness(segmenter, synthetic, real_test, real_train, device, seed: int = 0) -> dict:
    """Dice between the segmenter's prediction on each synthetic image and its conditioning mask. Label maps: per
    region (WT, TC, ET for BraTS), each with its own size bins; the record's headline is the first region (the
    whole lesion, as a binary mask would be) and `regions` holds them all."""
    from medgen.common.labels import region_masks
    vocab = synthetic.vocab
    pred_s = models.labels_of(models.predict(segmenter, synthetic.images, "segmentation", device), vocab)
    pred_r = models.labels_of(models.predict(segmenter, real_test.images, "segmentation", device), vocab)
    if vocab.binary:
        masks = {"tumour": (pred_s, synthetic.targets, pred_r, real_test.targets, real_train.targets)}
    else:
        cut = lambda x: region_masks(x, vocab)  # noqa: E731
        ps, ts, pr, tr, tt = (cut(x) for x in (pred_s, synthetic.targets, pred_r, real_test.targets,
                                               real_train.targets))
        masks = {r: (ps[r].float(), ts[r].float(), pr[r].float(), tr[r].float(), tt[r].float()) for r in ps}
    regions = {r: _faithful(*m, synthetic.ids, seed, np.asarray(synthetic.units), np.asarray(real_test.units))
               for r, m in masks.items()}
    head = next(iter(regions.values()))
    out = {"metric": "faithfulness_dice", **head,
           "method": {"segmenter": "downstream segmenter trained on the real training split (the utility harness)",
                      "dice": "per synthetic image with a non-empty conditioning mask; prediction thresholded at 0.5"
                      if vocab.binary else "per synthetic image and region with a non-empty conditioning region; "
                      "prediction: the most probable label", "bins": "lesion area as a fraction of the image; "
                      "edges at the terciles of the real training masks' areas (per region for label maps)",
                      "ci": "bootstrap over units (1000 resamples): a subject's slices (or a sample's) drawn "
                            "together"}}
    if not vocab.binary:
        out["regions"] = regions
        out["vocabulary"] = vocab.record()
    return out


def _faithful(pred_s, true_s, pred_r, true_r, true_train, ids: list[str], seed: int, units_s: np.ndarray,
              units_r: np.ndarray) -> dict:
    """Faithfulness of one binary mask kind: value, CI, ceiling on real test images, size bins, the lowest."""
    pixels = true_s[0, 0].numel()
    area = lambda t: (t > 0.5).flatten(1).sum(1).numpy() / pixels  # noqa: E731
    a_s, a_r, a_train = area(true_s), area(true_r), area(true_train)
    pos_train = a_train[a_train > 0]
    edges = np.quantile(pos_train, [1 / 3, 2 / 3]) if len(pos_train) else np.array([0.0, 0.0])
    d_s, d_r = dice(pred_s, true_s).numpy(), dice(pred_r, true_r).numpy()
    bins = []
    for b, name in enumerate(SIZE_BINS):
        lo = edges[b - 1] if b else 0.0
        hi = edges[b] if b < 2 else 1.0
        in_s, in_r = ((a > 0) & (a >= lo) & ((a < hi) if b < 2 else (a <= hi)) for a in (a_s, a_r))
        bins.append({"bin": name, "area_fraction": [float(lo), float(hi)],
                     "synthetic": _mean_ci(d_s[in_s], seed, units_s[in_s]),
                     "real_test": _mean_ci(d_r[in_r], seed, units_r[in_r])})
    pos_s = a_s > 0
    order = np.argsort(d_s[pos_s], kind="stable")
    names = np.asarray(ids)[pos_s]
    low = [{"id": str(names[i]), "dice": round(float(d_s[pos_s][i]), 4),
            "area_fraction": round(float(a_s[pos_s][i]), 4)} for i in order if d_s[pos_s][i] < LOW_DICE]
    empty = ~pos_s
    overall = _mean_ci(d_s[pos_s], seed, units_s[pos_s])
    return {"value": overall["mean"], "n": overall["n"], "n_units": overall["n_units"], "ci95": overall["ci95"],
            "ceiling": _mean_ci(d_r[a_r > 0], seed, units_r[a_r > 0]), "bins": bins, "low_dice_threshold": LOW_DICE,
            "low": low[:200], "n_low": len(low),
            "empty_masks": {"n": int(empty.sum()),
                            "predicted_foreground": int((pred_s[torch.from_numpy(empty)].flatten(1).sum(1) > 0).sum())}}


# ---------------------------------------------------------------- memorization
QUANTILES = (("p1", 0.01), ("p5", 0.05))
MIN_HELDOUT = 100          # held-out units below which the 1st-percentile threshold is the smallest distance
DUPLICATE_DISTANCE = 1e-3  # a held-out image this close to a training image is a copy of it, not a reference


def below_threshold(d_synth: np.ndarray, d_held: np.ndarray, q: float) -> dict:
    """How many synthetic images are closer to a training image than the q-th held-out order statistic, and
    what to expect without copying. If synthetic and held-out distances are independent draws of one law (no
    copying; one held-out item per subject, one_per_unit), the
    held-out threshold sits at U ~ Beta(k, n + 1 - k) of the distance distribution, so the count among m
    synthetic images is beta-binomial(m, k, n + 1 - k): its mean fraction is k / (n + 1) and its 2.5-97.5%
    range is the 95% range under no copying. A count above that range is an excess of near-copies."""
    threshold, k = order_threshold(d_held, q)
    n, m = len(d_held), len(d_synth)
    count = int((d_synth < threshold).sum())
    null = stats.betabinom(m, k, n + 1 - k)
    lo, hi = (float(null.ppf(p)) for p in (0.025, 0.975))
    return {"threshold": threshold, "k": k, "count": count, "fraction": count / m, "expected": k / (n + 1),
            "null_range": [lo / m, hi / m], "p_excess": float(null.sf(count - 1)), "excess": bool(count > hi)}


def _nth(k: int) -> str:
    """'' for 1, else '2nd ', '3rd ', '11th ', ...: 'the {_nth(k)}smallest'."""
    if k == 1:
        return ""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix} "


def one_per_unit(units: list[str], seed: int) -> np.ndarray:
    """One item of each unit (subject), drawn with a seed: the slices of one subject are not independent, and
    the held-out threshold is an order statistic of independent draws only when each subject gives one."""
    rng = np.random.default_rng(seed)
    return np.sort([rng.choice(rows) for rows in M.unit_members(units)])


def _nn_section(d_s, j_s, d_h, what: str) -> dict:
    return {"space": what, "below": {name: below_threshold(d_s, d_h, q) for name, q in QUANTILES},
            "synthetic_nn": {"median": float(np.median(d_s)), "min": float(d_s.min())},
            "heldout_nn": {"median": float(np.median(d_h)), "min": float(d_h.min())},
            "_d_synth": d_s, "_d_held": d_h, "_nn": j_s}


def memorization(synthetic, real_train, real_heldout, feature_net=None, device="cpu", out_dir: Path | None = None,
                 n_pairs: int = 8, seed: int = 0, notes: list[str] | None = None) -> dict:
    """Nearest training neighbours of synthetic images vs those of held-out real images (see below_threshold
    for what is expected without copying), by copy distance (common/neighbours) and in a feature space."""
    from skimage.metrics import structural_similarity
    index = CopyIndex(real_train.images, device)
    d_all, _ = index.query(real_heldout.images)
    duplicated = sorted({u for u, d in zip(real_heldout.units, d_all) if d < DUPLICATE_DISTANCE})
    if duplicated:     # a held-out copy of a training image would set the threshold at 0 and hide every copy
        keep = [i for i, u in enumerate(real_heldout.units) if u not in duplicated]
        real_heldout, d_all = real_heldout.subset(keep), d_all[keep]
    picked = one_per_unit(real_heldout.units, seed)
    reference, d_h = real_heldout.subset(picked), d_all[picked]
    d_s, j_s = index.query(synthetic.images)
    sections = {"pixel": _nn_section(d_s, j_s, d_h, f"pixels: sqrt(2 - 2 r), r = Pearson correlation, minimum "
                                                    f"over {TOLERANCE}")}
    if feature_net is not None:
        f = lambda ts: torch.nn.functional.normalize(torch.from_numpy(models.features(feature_net, ts.images, device)), dim=1)  # noqa: E731
        train_f = f(real_train)
        (fd_s, fj_s), (fd_h, _) = nearest(f(synthetic), train_f), nearest(f(reference), train_f)
        sections["feature"] = _nn_section(fd_s, fj_s, fd_h, "downstream features (L2-normalised, Euclidean)")
    px = sections["pixel"]
    order = np.argsort(px["_d_synth"], kind="stable")[:n_pairs]
    closest = []
    for i in order:
        a = synthetic.images[i].numpy()
        b = real_train.images[px["_nn"][i]].numpy()
        ssim = structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=min(7, min(a.shape[1:]) // 2 * 2 - 1))
        closest.append({"synthetic": synthetic.ids[i], "train": real_train.ids[px["_nn"][i]],
                        "distance": round(float(px["_d_synth"][i]), 5), "ssim": round(float(ssim), 4)})
    warnings = []
    if duplicated:
        shown = ", ".join(Path(u).name for u in duplicated[:5]) + (" ..." if len(duplicated) > 5 else "")
        warnings.append(f"{len(duplicated)} held-out subject(s) or image(s) hold copies of training images (copy "
                        f"distance below {DUPLICATE_DISTANCE:g}: {shown}): a leak in the real splits; they are "
                        "left out of the threshold, which they would have set at zero")
    n_held, n_units = len(real_heldout), len(reference)
    if n_units < MIN_HELDOUT:
        p1 = px["below"]["p1"]
        warnings.append(f"{n_units} held-out subjects or images (fewer than {MIN_HELDOUT}): the 1st-percentile "
                        f"threshold is the {_nth(p1['k'])}smallest of their distances, so "
                        f"{p1['expected'] * 100:.1f}% of fresh samples fall below it and only more than "
                        f"{p1['null_range'][1] * 100:.1f}% is flagged as an excess")
    rec = {"metric": "memorization", "value": px["below"]["p1"]["fraction"], "n": len(synthetic),
           "n_train": len(real_train), "n_heldout": n_held, "n_heldout_units": n_units, "heldout_seed": seed,
           "closest": closest,
           "tolerance": TOLERANCE, "detects": DETECTS, "misses": MISSES, "warnings": warnings,
           "notes": list(notes or []),
           "sections": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in sections.items()}}
    if out_dir is not None:
        from medgen.eval.obj_eval.utility.report import plot_closest_pairs, plot_memorization
        rec["plots"] = [str(plot_memorization(sections, Path(out_dir) / "memorization_hist.png")),
                        str(plot_closest_pairs(synthetic, real_train, order, px["_nn"],
                                               Path(out_dir) / "memorization_pairs.png"))]
    return rec


# ---------------------------------------------------------------- domain feature space
PRDC_MIN_PER_K = 100   # N per neighbour below which k-NN balls hold a large share of the set (N >= 100 k)


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k nearest neighbours; a point is inside a
    ball when its distance is strictly less than the radius, as the reference implementation (prdc) compares."""
    def dists(a, b):
        d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
        return np.sqrt(np.clip(d2, 0, None))
    d_rr, d_ff, d_rf = dists(real, real), dists(fake, fake), dists(real, fake)
    r_real = np.sort(d_rr, 1)[:, k]        # column 0 is the point itself
    r_fake = np.sort(d_ff, 1)[:, k]
    inside = d_rf < r_real[:, None]        # (real i, fake j): fake j inside real i's ball
    return {"precision": float(inside.any(0).mean()),
            "recall": float((d_rf < r_fake[None, :]).any(1).mean()),
            "density": float(inside.sum(0).mean() / k),
            "coverage": float((d_rf.min(1) < r_real).mean())}


def domain(feature_net, synthetic, real_heldout, device="cpu", n_boot: int = 50, seed: int = 0, k: int = 5) -> list[dict]:
    f_real = models.features(feature_net, real_heldout.images, device)
    f_syn = models.features(feature_net, synthetic.images, device)
    scale = np.sqrt(f_real.var(0).mean()) or 1.0        # units: the real set's mean per-dimension variance is 1
    f_real, f_syn = f_real / scale, f_syn / scale
    space = ("pooled deep encoder features of the downstream network trained on the real training split, "
             f"{f_real.shape[1]} dims, scaled so the real set's mean per-dimension variance is 1; real reference = "
             "the real held-out images")
    # the held-out reference is slices of a few subjects: both sets are resampled (FID) or left out (KID) by unit
    g_real, g_syn = np.asarray(real_heldout.units), np.asarray(synthetic.units)
    fid = M.fid_from_features(f_real, f_syn, n_boot, seed, g_syn, g_real)
    kid = M.kid_from_features(f_real, f_syn, seed, groups=g_syn, real_groups=g_real)
    n = {"synthetic": len(f_syn), "real": len(f_real)}
    rec = {"metric": "fid_domain", "value": fid["value"], "n": fid["n"], "ci95": fid["ci95"],
           "method": {"feature_network": "downstream (real data)", "space": space,
                      "ci": f"{n_boot} resamples of whole units (subjects) of both sets, re-centred on the value "
                            "(percentiles of FID* - (mean FID* - FID))" if fid["ci95"] else "none"}}
    warning = M.small_n_warning(len(f_real), len(f_syn), f_real.shape[1])
    if warning:
        rec["warning"] = warning
    out = [rec]
    if kid["value"] is not None:
        out.append(M.kid_record("kid_domain", {**kid, "n": n}, {"feature_network": "downstream (real data)",
                                                                "space": space, "estimator": kid["method"]}))
    if min(len(f_real), len(f_syn)) <= k:
        out.append({"metric": "prdc_domain", "available": False,
                    "reason": f"precision/recall need more than k={k} images in each set"})
    else:
        rec = {"metric": "prdc_domain", "value": prdc(f_real, f_syn, k), "n": n,
               "method": {"space": space, "k": k, "reference": "Naeem et al. 2020 (strict < as the prdc package)"}}
        if min(n.values()) < PRDC_MIN_PER_K * k:
            rec["warning"] = (f"N = {min(n.values())} < {PRDC_MIN_PER_K * k} ({PRDC_MIN_PER_K} per neighbour, k={k}): "
                              "each k-NN ball holds a large share of the set, so unrelated images fall inside "
                              "(precision and recall near 0.7 for noise at N = 22); read as indicative only")
        out.append(rec)
    return out
