"""Scores of a downstream model on the real test split, and the statistics that compare recipes.

Segmentation (MONAI metrics, on the binarised prediction at 0.5): Dice per slice (slices whose true mask is
empty are left out, MONAI's ignore_empty), Dice per subject (all of a subject's slices stacked), HD95 per slice
in pixels at the evaluation size; on volumes Dice and HD95 per volume, HD95 in mm with the grid's spacing. An
empty prediction of a non-empty truth scores HD95 = the image diagonal, and is counted.
Classification (scikit-learn): accuracy, balanced accuracy, macro one-vs-rest AUC (over the classes present in
the test set), quadratic-weighted Cohen's kappa (ordinal grades such as diabetic retinopathy 0-4), recall per
class.

Every score is kept per resampling unit (test subject, or test image) as a sum and a count for the decomposable
segmentation scores, and as the probabilities themselves for classification, so the paired bootstrap can
resample test units and recompute each score exactly.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from scipy import stats

from medgen.common.overlap import hd95
from medgen.eval.obj_eval.utility.names import CLASS_METRICS, SEG_METRICS, SEG_METRICS_3D  # noqa: F401

HIGHER_IS_BETTER = {"hd95_slice": False, "hd95_volume": False}
LABELS = {"dice_subject": "Dice per subject", "dice_slice": "Dice per slice", "hd95_slice": "HD95 per slice (px)",
          "hd95_volume": "HD95 per volume (mm)",
          "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "auc_macro_ovr": "macro OvR AUC",
          "kappa_quadratic": "quadratic kappa"}
# Bump when a score's definition changes: stored per-model results with another version are recomputed.
SCORES_VERSION = 2


def ordinal_classes(names: list[str]) -> bool:
    """Class names that are integer grades in their own order (APTOS 0-4): quadratic kappa's setting."""
    try:
        grades = [int(n) for n in names]
    except ValueError:
        return False
    return len(grades) > 1 and grades == sorted(grades)


def base_metric(metric: str) -> str:
    """'dice_subject_WT' -> 'dice_subject' (a score of one region of a label map)."""
    for base in LABELS:
        if metric.startswith(base + "_"):
            return base
    return metric


def metric_label(metric: str) -> str:
    base = base_metric(metric)
    return LABELS.get(base, base) + (f" {metric[len(base) + 1:]}" if base != metric else "")


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER.get(base_metric(metric), True)


# ---------------------------------------------------------------- segmentation
def _mask_scores(pred: torch.Tensor, true: torch.Tensor, unit_of: np.ndarray, n: int, spacing, names) -> dict:
    """Per-unit sums and counts of each score of one binary mask pair, the excluded items, the empty
    predictions and the per-item Dice."""
    from monai.metrics import compute_dice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # MONAI warns about every empty mask it skips
        dice = compute_dice(pred, true, include_background=True, ignore_empty=True)[:, 0].numpy()
        hd, empty_pred = hd95(pred, true, spacing)
    inter = (pred * true).flatten(1).sum(1).numpy()
    total = (pred.flatten(1).sum(1) + true.flatten(1).sum(1)).numpy()
    subj_inter, subj_total = np.bincount(unit_of, inter, n), np.bincount(unit_of, total, n)
    subj_true = np.bincount(unit_of, true.flatten(1).sum(1).numpy(), n)
    subj_ok = subj_true > 0                    # subjects without tumour have no Dice (as MONAI's ignore_empty)
    subj_dice = np.where(subj_ok, 2 * subj_inter / np.maximum(subj_total, 1e-9), 0.0)
    per_unit = {"dice_subject": (subj_dice, subj_ok.astype(float))}
    for name, vals in (("dice_slice", dice), (names[-1], hd)):
        if name in names:
            ok = np.isfinite(vals)
            per_unit[name] = (np.bincount(unit_of, np.where(ok, vals, 0.0), n),
                              np.bincount(unit_of, ok.astype(float), n))
    excluded = {"dice_slice": int((~np.isfinite(dice)).sum()), names[-1]: int((~np.isfinite(hd)).sum()),
                "dice_subject": int((~subj_ok).sum())}
    return {"per_unit": per_unit, "excluded": excluded, "empty": int(empty_pred.sum()), "dice": dice}


def segmentation_scores(probs: torch.Tensor, test) -> dict:
    """Every segmentation score per test unit. Binary masks: the prediction at 0.5. Label maps (test.vocab): the
    most probable class, each score per region (dice_subject_WT, ...), and the unsuffixed score pooled over the
    regions (a unit's sum and count add up its regions: the mean over subjects and regions for dice_subject)."""
    from medgen.common.labels import region_masks
    from medgen.eval.obj_eval.utility.models import labels_of
    vocab = getattr(test, "vocab", None)
    volumes = probs.dim() == 5
    units, unit_of = test.unit_index()
    n = len(units)
    names = SEG_METRICS_3D if volumes else SEG_METRICS
    spacing = getattr(test, "spacing", None) if volumes else None
    if vocab is None or vocab.binary:
        parts = {"": _mask_scores((probs > 0.5).float(), (test.targets > 0.5).float(), unit_of, n, spacing, names)}
    else:
        pred_r, true_r = region_masks(labels_of(probs, vocab), vocab), region_masks(test.targets, vocab)
        parts = {f"_{r}": _mask_scores(pred_r[r].float(), true_r[r].float(), unit_of, n, spacing, names)
                 for r in pred_r}
    per_unit, excluded = {}, {}
    for suffix, part in parts.items():
        for name, (sums, counts) in part["per_unit"].items():
            per_unit[name + suffix] = (sums, counts)
            pooled = per_unit.get(name, (0.0, 0.0)) if suffix else (0.0, 0.0)
            per_unit[name] = (pooled[0] + sums, pooled[1] + counts)
        excluded.update({k + suffix: v for k, v in part["excluded"].items()})
    metrics = list(names) + [m + suffix for suffix in parts if suffix for m in names]
    out = {"units": units, "n_items": len(probs),
           "per_unit": {k: {"sum": np.asarray(a).tolist(), "count": np.asarray(c).tolist()}
                        for k, (a, c) in per_unit.items()},
           "excluded": excluded, "empty_predictions": sum(p["empty"] for p in parts.values())}
    out["metrics"] = {m: metric_on(out, m, np.arange(n)) for m in metrics}
    first = next(iter(parts.values()))                   # the whole lesion: binary's mask, or WT (the first region)
    out["per_slice_dice"] = np.nan_to_num(first["dice"], nan=-1.0).round(5).tolist()   # -1: empty truth
    return out


# ---------------------------------------------------------------- classification
def auc_macro_ovr(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean over classes of the one-vs-rest ROC AUC; a class absent from labels (or the only one) is left out."""
    from sklearn.metrics import roc_auc_score
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in range(probs.shape[1])
            if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(aucs)) if aucs else float("nan")


def class_metric(name: str, labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score
    pred = probs.argmax(1)
    if name == "accuracy":
        return float(accuracy_score(labels, pred))
    if name == "balanced_accuracy":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a resample may lack a class that the model predicts
            return float(balanced_accuracy_score(labels, pred))
    if name == "auc_macro_ovr":
        return auc_macro_ovr(labels, probs)
    if name == "kappa_quadratic":
        k = cohen_kappa_score(labels, pred, weights="quadratic", labels=np.arange(probs.shape[1]))
        return float(k) if np.isfinite(k) else 0.0   # one class only in truth and prediction: no agreement beyond chance
    raise KeyError(name)


def classification_scores(probs: torch.Tensor, test) -> dict:
    p, y = probs.numpy().astype(np.float64), test.targets.numpy()
    out = {"units": list(test.units), "probs": p.round(6).tolist(), "labels": y.tolist(), "n_items": len(y)}
    out["metrics"] = {m: class_metric(m, y, p) for m in CLASS_METRICS}
    pred = p.argmax(1)
    out["recall_per_class"] = {c: (float((pred[y == k] == k).mean()) if (y == k).any() else None)
                               for k, c in enumerate(test.classes)}
    return out


def scores(task: str, probs: torch.Tensor, test) -> dict:
    return segmentation_scores(probs, test) if task == "segmentation" else classification_scores(probs, test)


# ---------------------------------------------------------------- statistics
def metric_on(result: dict, name: str, idx: np.ndarray) -> float | np.ndarray:
    """The score on the test units idx (with repeats: a bootstrap resample). idx of shape (B, n) gives B values."""
    idx = np.asarray(idx)
    if "per_unit" in result:
        s, c = (np.asarray(result["per_unit"][name][k]) for k in ("sum", "count"))
        total = c[idx].sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(total > 0, s[idx].sum(-1) / np.where(total > 0, total, 1), np.nan)
        return value if idx.ndim == 2 else float(value)
    y, p = np.asarray(result["labels"]), np.asarray(result["probs"])
    if idx.ndim == 2:
        if name in CONFUSION_METRICS:
            return class_metric_resamples(name, y, p.argmax(1), p.shape[1], idx)
        return np.array([class_metric(name, y[i], p[i]) for i in idx])
    return class_metric(name, y[idx], p[idx])


CONFUSION_METRICS = ("accuracy", "balanced_accuracy", "kappa_quadratic")


def class_metric_resamples(name: str, labels: np.ndarray, pred: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """class_metric for every resample idx[b] at once, from B confusion matrices built with one bincount
    (scikit-learn's definitions, which the tests check it against; a thousand sklearn calls took seconds)."""
    b = np.arange(len(idx))[:, None]
    conf = np.bincount((b * k * k + labels[idx] * k + pred[idx]).ravel(), minlength=len(idx) * k * k)
    conf = conf.reshape(len(idx), k, k).astype(np.float64)
    n = conf.sum((1, 2))
    diag = np.diagonal(conf, axis1=1, axis2=2)
    if name == "accuracy":
        return diag.sum(1) / n
    true = conf.sum(2)                                     # per resample, the items of each true class
    if name == "balanced_accuracy":                        # mean recall over the classes present in the truth
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(true > 0, diag / np.where(true > 0, true, 1), np.nan), 1)
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2.0
    expected = true[:, :, None] * conf.sum(1)[:, None, :] / n[:, None, None]
    observed_w, expected_w = (conf * weights).sum((1, 2)), (expected * weights).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = 1 - observed_w / expected_w
    return np.where(np.isfinite(kappa), kappa, 0.0)      # one class only: no agreement beyond chance, as class_metric


def seed_ci(values) -> dict:
    """Mean over seeds with a 95% t-interval (Student t with n-1 degrees of freedom)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0}
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci95": None, "sd": None, "n": 1}
    sd = float(v.std(ddof=1))
    half = float(t_quantile(0.975, len(v) - 1) * sd / np.sqrt(len(v)))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "sd": sd, "n": len(v)}


def paired_bootstrap(recipe: list[dict], real: list[dict], name: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Test-set uncertainty for these trained models: the difference recipe - real of one score, averaged over
    the paired seeds, with test units (subjects or images) resampled while the models stay fixed. It says how
    much the figure would move on another test set drawn like this one; it says nothing about another training
    run, so it is not the verdict (`seed_paired_test` is). Returns the observed difference, the 2.5/97.5
    percentiles of the resampled differences and a two-sided bootstrap p-value."""
    if len(recipe) != len(real) or not recipe:
        raise ValueError("paired results need the same seeds")
    n = len(real[0]["units"])
    if any(r["units"] != real[0]["units"] for r in recipe + real):
        raise ValueError("paired results must be scored on the same test units")
    all_units = np.arange(n)
    observed = float(np.nanmean([metric_on(a, name, all_units) - metric_on(b, name, all_units)
                                 for a, b in zip(recipe, real)]))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    diffs = np.nanmean(np.stack([metric_on(a, name, idx) - metric_on(b, name, idx) for a, b in zip(recipe, real)]), 0)
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) == 0:
        return {"diff": observed, "ci95": None, "p": None, "n_units": n, "n_boot": 0}
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    p = min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))
    # the interval the verdict uses over test units: the bootstrap's standard error, widened for a small test set
    # (n / (n - 1): the bootstrap's variance is the plug-in one) and with t quantiles on n - 1 df; the percentile
    # interval above is too narrow with a dozen units (a 12-subject null reads distinguishable 11-14% of the time)
    half = t_quantile(0.975, max(1, n - 1)) * float(diffs.std(ddof=1)) * np.sqrt(n / max(1, n - 1)) \
        if len(diffs) > 1 else float("inf")
    return {"diff": observed, "ci95": [float(lo), float(hi)], "p": float(p), "n_units": n, "n_boot": int(len(diffs)),
            "distinguishable": bool(lo > 0 or hi < 0), "units_ci95": [observed - half, observed + half]}


# A verdict about a recipe is a claim about training runs, so its uncertainty is the spread between training
# runs: the per-seed paired differences d_s = score(recipe, s) - score(real, s), each on the whole test set, and
# a t-interval with n - 1 degrees of freedom. Below MIN_SEEDS the spread of the d_s is one or two numbers and
# the interval is a guess (t_0.975 is 12.7 at one degree of freedom). Below MIN_TEST_UNITS test units a single
# subject carries over a tenth of the score: the seeds then compare the recipes on a handful of particular
# subjects, and nothing supports the claim about patients that a report sentence makes.
MIN_SEEDS = 3
MIN_TEST_UNITS = 10
POWER = 0.8


def scored_units(result: dict, name: str) -> int:
    """The test units that enter a score (segmentation: units whose count for it is positive)."""
    if "per_unit" in result:
        return int((np.asarray(result["per_unit"][name]["count"]) > 0).sum())
    return len(set(result["units"]))


@functools.lru_cache(maxsize=256)
def t_quantile(q: float, df: int) -> float:
    """Student's t quantile, cached: studies and their simulations ask for the same few degrees of freedom."""
    return float(stats.t.ppf(q, df))


def detectable_difference(sd: float, n: int, power: float = POWER) -> float:
    """The smallest true difference a two-sided 5% paired t-test over n seeds finds with the given power when
    the per-seed differences spread by sd (the usual (t_0.975 + t_power) sd / sqrt(n) approximation)."""
    return float((t_quantile(0.975, n - 1) + t_quantile(power, n - 1)) * sd / np.sqrt(n))


DETECTABLE_BOUND = 0.9   # the one-sided confidence of the detectable difference's upper bound


def sd_upper(sd: float, n: int, confidence: float = DETECTABLE_BOUND) -> float:
    """Upper confidence bound of a normal spread estimated from n values: sd sqrt((n - 1) / chi2_{1-c}(n - 1)).
    At 3 seeds the estimate has 2 degrees of freedom and the bound is 3.1 sd: a seed sd is a rough figure."""
    return float(sd * np.sqrt((n - 1) / stats.chi2.ppf(1 - confidence, n - 1)))


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (in the given order): the family-wise error rate of 'adjusted p <
    alpha' is at most alpha for any dependence between the tests."""
    order = np.argsort(p, kind="stable")
    m, out, running = len(p), [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p[i])))
        out[i] = running
    return out


def seed_paired_test(recipe: list[dict], real: list[dict], name: str, unit: str = "unit",
                     min_seeds: int = MIN_SEEDS, min_units: int = MIN_TEST_UNITS) -> dict:
    """The verdict of recipe vs real on one score: the mean of the per-seed paired differences, its 95%
    t-interval and two-sided p-value (a paired t-test over seeds), and whether it is assessable at all
    (enough seeds and test units; else `why_not` gives the counts). `detectable` is the difference this
    study would find with 80% power, from the seed-to-seed spread it observed, and `detectable_upper` the same
    at the spread's 90% upper confidence bound (few seeds estimate the spread roughly)."""
    if len(recipe) != len(real) or not recipe:
        raise ValueError("paired results need the same seeds")
    every = np.arange(len(real[0]["units"]))
    d = np.array([metric_on(a, name, every) - metric_on(b, name, every) for a, b in zip(recipe, real)], float)
    d = d[np.isfinite(d)]
    units = min(scored_units(r, name) for r in recipe + real)
    out = {"diff": float(d.mean()) if len(d) else None, "per_seed": d.round(6).tolist(), "n_seeds": int(len(d)),
           "n_units": units, "ci95": None, "p": None, "sd": None, "detectable": None, "distinguishable": False,
           "method": "paired t-test over seeds (per-seed differences on the whole test set, t with n-1 df)"}
    short = [f"{len(d)} seed(s) with a score, at least {min_seeds} needed" if len(d) < min_seeds else "",
             f"{units} test {unit}(s) with a score, at least {min_units} needed" if units < min_units else ""]
    out["why_not"] = "; ".join(s for s in short if s) or None
    out["assessable"] = out["why_not"] is None
    if len(d) < 2:
        return out
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):   # identical differences on every seed (deterministic training)
        out.update(sd=sd, assessable=False, why_not=(
            f"the {n} seeds gave the same difference ({mean:+.4f}): with no seed-to-seed variation there is "
            "nothing to test it against (do the seeds change the training? data order and initialisation "
            "should differ between them)"))
        return out
    half = float(t_quantile(0.975, n - 1) * sd / np.sqrt(n))
    p = float(2 * stats.t.sf(abs(mean) / (sd / np.sqrt(n)), n - 1))
    out.update(ci95=[mean - half, mean + half], p=p, sd=sd, detectable=detectable_difference(sd, n),
               detectable_upper=detectable_difference(sd_upper(sd, n), n),
               distinguishable=bool(out["assessable"] and (mean - half > 0 or mean + half < 0)))
    return out
