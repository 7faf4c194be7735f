"""One evaluation: load both sets, compute the requested metrics, write metrics.json, the report and plots.

Every metric is a record {metric, value, n, ci95, method, floor?}; a metric that cannot be computed (weights
missing, no pairs) is a record with available: false and the reason, never a made-up number.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgen.common.data import pad_square
from medgen.config.paths import PathConfig
from medgen.eval.obj_eval.core import metrics as M
from medgen.eval.obj_eval.core.inputs import EvalSet, load_set, pair
from medgen.eval.obj_eval.core.networks import load_fid_network, load_lpips
from medgen.common.outputs import claim
from medgen.common.errors import UserError, shape_text
from medgen.common.fileio import atomic_write, atomic_write_text

ALL_METRICS = ("fid", "lpips", "ms_ssim", "mae", "psnr")
# need a downstream network trained on real training data (--real-train-dir); asked for by name, not by "all"
DOWNSTREAM_METRICS = ("faithfulness", "memorization", "domain")
# label maps: intensity per label region, real against synthetic (core/regions.py); part of "all" for label maps
REGION_METRICS = ("region_intensity",)
# edited scans (generate.py --inpaint_into): identity outside the region and the seam; part of "all" for them
INPAINT_METRICS = ("inpainting",)
RESIZE = "bilinear with antialiasing (images), from the training loaders' crop/pad/resize"
DIVERSITY_CI = "bootstrap over samples (pairs formed among the drawn samples), not over pairs, which share samples"


@dataclass
class Options:
    synthetic_dir: str
    real_dir: str | None                  # None: diversity only, without the real-vs-real reference
    metrics: tuple[str, ...] = ALL_METRICS
    image_type: str = "bravo"
    image_size: int | None = None
    positive_only: bool = False
    layout: str = "original"
    feature_networks: tuple[str, ...] = ("inception", "radimagenet")
    weights: dict = field(default_factory=dict)          # kind -> path
    weights_sha256: dict = field(default_factory=dict)   # kind -> digest
    lpips_net: str = "alex"
    modes: tuple[str, ...] = ("quality", "diversity")
    data_range: float = 1.0
    bootstrap: int = 50
    max_pairs: int = 2000
    batch_size: int = 64
    device: str = "auto"
    seed: int = 0
    floor: bool = True
    output: str | None = None
    skip_bad: bool = False                # NIfTI sets: leave out subjects whose files fail the scan
    compute: str = "auto"                 # where the caches live (config/paths.py)
    real_train_dir: str | None = None     # downstream metrics: the real training data (a root or its train/;
                                          # faithfulness/domain default to real_dir, memorization needs it)
    split_seed: int | None = None         # downstream metrics on a flat real folder: its split (default: the
    val_fraction: float | None = None     # generator's record in generation.json)
    downstream: dict = field(default_factory=dict)   # downstream metrics: TrainSettings fields (preset, ...)
    spatial_dims: int = 2                 # 3: whole volumes (2.5D FID, 3D MS-SSIM, MAE/PSNR per volume)
    volume_shape: list[int] | None = None  # volumes: the [H, W, D] grid (None: the synthetic set's own)
    labels: str | None = None             # masks' label vocabulary (None: the synthetic set's generation.json, else
                                          # binary); label maps: per-region scores and intensities


def parse_metrics(text: str) -> tuple[str, ...]:
    names = [m.strip().replace("-", "_") for m in text.split(",") if m.strip()]
    names = tuple(dict.fromkeys(n for m in names for n in (ALL_METRICS if m == "all" else (m,))))
    known = ALL_METRICS + DOWNSTREAM_METRICS + REGION_METRICS + INPAINT_METRICS
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise UserError(f"--metrics: unknown metric {unknown[0] if unknown else text!r} (choose all or a comma list "
                        f"of {', '.join(known)}; all = {', '.join(ALL_METRICS)}, region_intensity for label maps, "
                        "inpainting for --inpaint_into datasets)")
    if "all" in [m.strip() for m in text.split(",")]:
        names += ("all",)                  # evaluate() adds region_intensity when the masks are label maps
    return names


def unavailable(metric: str, reason: str, **extra) -> dict:
    return {"metric": metric, "available": False, "reason": reason, **extra}


def guarded_list(name: str, compute) -> list[dict]:
    """guarded() for a family that returns several records."""
    rec = guarded(name, compute)
    return rec if isinstance(rec, list) else [rec]


def guarded(name: str, compute) -> dict:
    """One metric's record; a failure becomes an unavailable record with the reason, so that one metric that
    cannot be computed never discards the others."""
    try:
        return compute()
    except UserError as err:
        return unavailable(name, str(err))
    except Exception as err:  # noqa: BLE001 - reported in the record and on stderr, the other metrics go on
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        return unavailable(name, f"failed: {type(err).__name__}: {detail}")


def load_sets(o: Options) -> tuple[EvalSet, EvalSet | None]:
    from medgen.eval.obj_eval.core.inputs import existing_folder, native_size
    if o.real_dir is not None:
        existing_folder(o.real_dir, "--real-dir")  # before the synthetic set is read
    from medgen.eval.obj_eval.core.inputs import native_volume_shape
    volume = None
    if o.spatial_dims == 3:
        size, volume = None, o.volume_shape or native_volume_shape(o.synthetic_dir)
    else:
        size = o.image_size or native_size(o.synthetic_dir, "--synthetic-dir")
    synth = load_set(o.synthetic_dir, o.image_type, size, o.positive_only, o.layout, what="--synthetic-dir",
                     skip_bad=o.skip_bad, compute=o.compute, volume_shape=volume)
    if o.real_dir is None:
        return synth, None
    real = load_set(o.real_dir, o.image_type, size, o.positive_only, o.layout, what="--real-dir", skip_bad=o.skip_bad,
                    compute=o.compute, volume_shape=volume)
    if synth.images.shape[1] != real.images.shape[1]:
        raise UserError(f"--synthetic-dir has {synth.images.shape[1]}-channel images, --real-dir "
                        f"{real.images.shape[1]}-channel ones")
    return synth, real


# ---------------------------------------------------------------- metric families
PLANES = ("axial", "coronal", "sagittal")


def plane_slices(s: EvalSet, plane: str) -> EvalSet:
    """Every slice of every volume along one plane, zero-padded to a square (2.5D FID, as MAISI reports it)."""
    axis = 2 + PLANES.index(plane)                     # (N, C, D, H, W): axial cuts D, coronal H, sagittal W
    x = pad_square(s.images.movedim(axis, 1).flatten(0, 1))   # (N k, C, a, b) -> square
    k = s.images.shape[axis]
    ids = [f"{i}#{plane}{j}" for i in s.ids for j in range(k)]
    return EvalSet(s.root, s.kind, x, ids, ids)


def fid_records(o: Options, synth: EvalSet, real: EvalSet, device) -> list[dict]:
    """FID and KID per feature network; on volumes per plane (2.5D) and their means."""
    out = []
    for kind in o.feature_networks:
        name = f"fid_{kind}"
        try:
            net, digest = load_fid_network(kind, o.weights.get(kind), o.weights_sha256.get(kind))
        except UserError as err:
            out.append(unavailable(name, str(err), feature_network=kind))
            continue
        if synth.images.dim() == 4:
            out += with_kid(guarded(name, lambda: fid_record(o, synth, real, device, kind, net, digest)))
            continue
        planes = [guarded(f"{name}_{p}", lambda p=p: fid_record(o, plane_slices(synth, p), plane_slices(real, p),
                                                                device, kind, net, digest, f"{name}_{p}",
                                                                volumes=len(synth)))
                  for p in PLANES]
        out += [r for p in planes for r in with_kid(p)]
        if all(r.get("available", True) for r in planes):
            what = "mean of the axial, coronal and sagittal {} (every slice of every volume along each plane)"
            out.append({"metric": f"{name}_2.5d", "value": float(np.mean([r["value"] for r in planes])),
                        "n": planes[0]["n"], "method": {"feature_network": kind, "weights_sha256": digest,
                                                        "what": what.format("FIDs")}})
            kids = [r["kid"] for r in planes]
            if all(k["value"] is not None for k in kids):
                se = float(np.mean([k["se"] for k in kids])) if all(k["se"] is not None for k in kids) else None
                out.append(M.kid_record(f"kid_{kind}_2.5d", {"value": float(np.mean([k["value"] for k in kids])),
                                                          "se": se, "n": planes[0]["n"]},
                                      {"feature_network": kind, "what": what.format("KIDs"),
                                       "se": "mean of the planes' standard errors (the planes share volumes: "
                                             "the bound for fully dependent planes)"}))
    return out


def with_kid(rec: dict) -> list[dict]:
    """A FID record, and the KID record computed beside it (the unbiased small-N companion)."""
    kid = rec.get("kid")
    if not kid or kid.get("value") is None:
        return [rec]
    name = "kid" + rec["metric"][3:]
    return [rec, M.kid_record(name, {**kid, "n": rec["n"]}, {"feature_network": rec["method"]["feature_network"],
                                                           "estimator": kid.get("method")})]


def read_feature_cache(path: Path, n: int) -> np.ndarray | None:
    """Cached real-set features, or None when absent or unreadable (then rebuilt; said in one line)."""
    if not path.is_file():
        return None
    try:
        feats = np.load(path, allow_pickle=False)
        if feats.ndim == 2 and len(feats) == n and np.isfinite(feats).all():
            return feats
    except (OSError, ValueError, EOFError):
        pass
    print(f"warning: {path}: unreadable FID feature cache; rebuilding it", file=sys.stderr)
    return None


def fid_record(o: Options, synth: EvalSet, real: EvalSet, device, kind: str, net, digest: str,
               name: str | None = None, volumes: int | None = None) -> dict:
    """One FID record. `volumes`: the sets are the slices of that many synthetic volumes along one plane
    (plane_slices), which the interval resamples whole and the counts and the small-N warning report."""
    name = name or f"fid_{kind}"
    cache = PathConfig.from_compute(o.compute).cache_root / "fid_features"
    key = cache / f"{kind}-{M.content_key(real.images, digest, real.images.shape)}.npy"
    real_f = read_feature_cache(key, len(real))
    if real_f is None:
        real_f = M.extract_features(net, real.images, device, o.batch_size, f"{kind} features (real)")
        atomic_write(key, lambda tmp, f=real_f: np.save(open(tmp, "wb"), f))
    synth_f = M.extract_features(net, synth.images, device, o.batch_size, f"{kind} features (synthetic)")
    groups, real_groups = ([i.split("#")[0] for i in s.ids] for s in (synth, real)) if volumes else (None, None)
    res = M.fid_from_features(real_f, synth_f, o.bootstrap, o.seed, groups)
    kid = M.kid_from_features(real_f, synth_f, o.seed, groups, real_groups)
    rec = {"metric": name, "value": res["value"], "n": res["n"], "ci95": res["ci95"],
           "method": {"feature_network": kind, "weights_sha256": digest, "features": real_f.shape[1],
                      "statistics": "float64 mean and covariance",
                      "ci": (f"{o.bootstrap} resamples" + (" of whole volumes (their slices together)" if volumes
                                                              else "") + f"; {M.FID_CI_METHOD}") if res["ci95"] else "none",
                      "resampling_bias": res.get("resampling_bias"),
                      "input": ("bilinear resize to 299 px, [0,1] -> [-1,1], grey -> 3 channels"
                                if kind == "inception" else
                                "native size, grey -> 3 channels, RGB -> BGR, minus ImageNet BGR mean"),
                      "resize": RESIZE, "real_features_cache": str(key)}}
    if volumes:
        rec["n"] = {**rec["n"], "synthetic_volumes": volumes, "real_volumes": len({i.split("#")[0] for i in real.ids})}
    rec["kid"] = kid
    warning = M.small_n_warning(len(real_f), len(synth_f), real_f.shape[1], volumes, rec["n"].get("real_volumes"))
    if warning:
        rec["warning"] = warning
        print(f"warning: {name}: {warning}", file=sys.stderr)
    if o.floor and len(real_f) >= 4:
        perm = np.random.default_rng(o.seed).permutation(len(real_f))
        half = len(real_f) // 2
        rec["floor"] = {"value": M.fid_from_features(real_f[perm[:half]], real_f[perm[half:2 * half]], 0)["value"],
                        "n": half, "what": "real vs real (two random halves of the real set)"}
    return rec


def usable_lpips(lpips_net, size: int, ndim: int = 4):
    """(network, digest) when LPIPS can run on size-px images; else a UserError with the reason."""
    if ndim == 5:
        raise UserError("LPIPS is a 2D network; volumes are compared with 2.5D FID, 3D MS-SSIM, MAE and PSNR")
    if isinstance(lpips_net, str):
        raise UserError(lpips_net)
    net = lpips_net[0]
    if size < net.min_size:
        raise UserError(f"LPIPS-{net.net_name} needs images of at least {net.min_size} px (these are {size} px): "
                        f"evaluate with --image-size {net.min_size} or larger" +
                        (", or use --lpips-net vgg (16 px)" if net.net_name == "alex" and size >= 16 else ""))
    return lpips_net


def pair_records(o: Options, synth: EvalSet, real: EvalSet, device, wanted: set[str], lpips_net=None) -> list[dict]:
    """Quality metrics on matched pairs: MAE, PSNR, MS-SSIM quality, LPIPS quality."""
    s_idx, r_idx, how = pair(synth, real)
    names = [n for n in ("mae", "psnr", "ms_ssim_quality", "lpips_quality") if n.split("_q")[0] in wanted]
    if not s_idx:
        reason = ("no synthetic sample could be paired with a real slice (pairs come from a generation manifest "
                  "made with --masks_from, or from equal sample ids); these metrics need pairs")
        return [unavailable(n, reason) for n in names]
    a, b = synth.images[s_idx], real.images[r_idx]
    common = {"pairs_by": how, "data_range": o.data_range, "resize": RESIZE}

    def mae():
        return M.summary(M.pair_distances(M.mae, a, b, device, o.batch_size), "mae", dict(common), o.seed)

    def psnr():
        vals = M.pair_distances(lambda x, y: M.psnr(x, y, o.data_range), a, b, device, o.batch_size)
        return M.summary(vals, "psnr", {**common, "per_pair": "10 log10(range^2 / MSE), then the mean",
                                        "cap_db": M.PSNR_CAP_DB,
                                        "identical_pairs": int((vals >= M.PSNR_CAP_DB).sum())}, o.seed)

    def ms_ssim():
        window, weights = M.ms_ssim_settings(min(a.shape[2:]))
        vals = M.pair_distances(lambda x, y: M.ms_ssim(x, y, o.data_range, window, weights), a, b, device, o.batch_size)
        return M.summary(vals, "ms_ssim_quality", {**common, "window": window, "scales": len(weights),
                                                    "weights": weights, "sigma": 1.5}, o.seed)

    def lpips():
        net, digest = usable_lpips(lpips_net, a.shape[-1], a.dim())
        vals = M.pair_distances(net.to(device), a, b, device, o.batch_size)
        return M.summary(vals, "lpips_quality", {**common, "network": f"{o.lpips_net} v0.1",
                                                  "weights_sha256": digest}, o.seed)
    computes = {"mae": mae, "psnr": psnr, "ms_ssim_quality": ms_ssim, "lpips_quality": lpips}
    return [guarded(n, computes[n]) for n in names]


def diversity_records(o: Options, synth: EvalSet, real: EvalSet, device, wanted: set[str], lpips_net=None) -> list[dict]:
    """Mean pairwise similarity among synthetic samples (lower MS-SSIM / higher LPIPS = more diverse),
    overall and within samples sharing a conditioning mask; the real set's value is the reference."""
    size = min(synth.images.shape[2:])

    def ms_ssim():
        window, weights = M.ms_ssim_settings(size)
        return (lambda x, y: M.ms_ssim(x, y, o.data_range, window, weights),
                {"window": window, "scales": len(weights), "weights": weights, "sigma": 1.5, "data_range": o.data_range})

    def lpips():
        net, digest = usable_lpips(lpips_net, size, synth.images.dim())
        return net.to(device), {"network": f"{o.lpips_net} v0.1", "weights_sha256": digest}
    fns = {name: f for name, f, key in (("ms_ssim_diversity", ms_ssim, "ms_ssim"), ("lpips_diversity", lpips, "lpips"))
           if key in wanted}
    return [guarded(name, lambda: diversity_record(o, synth, real, device, name, *spec()))
            for name, spec in fns.items()]


def diversity_record(o: Options, synth: EvalSet, real: EvalSet, device, name: str, fn, method: dict) -> dict:

    def mean_over(s: EvalSet, groups=None):
        i, j = M.diversity_pairs(len(s), o.max_pairs, o.seed, groups)
        vals = M.pair_distances(fn, s.images[i], s.images[j], device, o.batch_size) if len(i) else np.zeros(0)
        return vals, (i, j, len(s))
    vals, pairs = mean_over(synth)
    if len(vals) == 0:
        return unavailable(name, "fewer than two synthetic samples")
    rec = M.summary(vals, name, {**method, "pairs": f"distinct synthetic samples (at most {o.max_pairs}, seeded)",
                                 "ci": DIVERSITY_CI, "resize": RESIZE}, o.seed, pairs)
    within, wpairs = mean_over(synth, synth.groups) if synth.groups else (np.zeros(0), None)
    rec["within_condition"] = (M.summary(within, name + "_within_condition", {"pairs": "samples sharing a "
                                         "conditioning mask", "ci": DIVERSITY_CI}, o.seed, wpairs)
                               if len(within) else
                               {"available": False, "reason": "no two samples share a conditioning mask"})
    if o.floor:
        ref, _ = mean_over(real)
        rec["floor"] = {"value": float(ref.mean()), "n": int(len(ref)),
                        "what": "the same statistic among real slices"}
    return rec


def volume_grid(s: EvalSet) -> list[int] | None:
    """[H, W, D] of a set of volumes (data.volume_shape's order); None for images."""
    if s.images.dim() != 5:
        return None
    d, h, w = (int(n) for n in s.images.shape[2:])
    return [h, w, d]


def downstream_records(o: Options, wanted: set[str], device, grid: list[int] | None = None) -> list[dict]:
    """Faithfulness, memorization and the domain feature-space metrics (eval/obj_eval/utility/audit.py), with
    the downstream network trained on the real training data; one unavailable record each when that fails.
    `grid`: the volume grid the image metrics read both sets on (volumes only)."""
    from medgen.eval.obj_eval.utility.sections import audit_records
    names = [m for m in DOWNSTREAM_METRICS if m in wanted]
    missing = []
    if "memorization" in names and not o.real_train_dir:
        names.remove("memorization")
        missing.append(unavailable("memorization", "memorization needs --real-train-dir: the generator's training "
                                   "data (a dataset root or its train/ split). --real-dir is a val or test set, and "
                                   "splitting it again would audit against subjects the generator never saw"))
    if not names:
        return missing
    out = Path(o.output) if o.output else Path(o.synthetic_dir) / "eval"
    flag = "--real-train-dir" if o.real_train_dir else "--real-dir"
    try:
        recs = audit_records(names, o.real_train_dir or o.real_dir, o.synthetic_dir, o.image_type, grid or o.image_size,
                             o.positive_only, o.layout, o.downstream, o.seed, str(device), out, o.compute,
                             o.split_seed, o.val_fraction, flag, o.labels)
    except UserError as err:
        return missing + [unavailable(n, str(err)) for n in names]
    flat = list(missing)
    for r in recs:   # one row per number in the report: precision/recall/density/coverage apart
        if r["metric"] == "prdc_domain" and r.get("available") is not False:
            flat += [{"metric": f"{k}_domain", "value": v, "n": r["n"], "method": r["method"],
                      **({"warning": r["warning"]} if "warning" in r else {})} for k, v in r["value"].items()]
        elif r["metric"] == "faithfulness_dice":
            flat.append({**r, "floor": {"value": r["ceiling"]["mean"], "n": r["ceiling"]["n"],
                                        "what": "the same segmenter on real test images (ceiling)"}})
        elif r["metric"] == "memorization":
            p1 = r["sections"]["pixel"]["below"]["p1"]
            flat.append({**r, "floor": {"value": p1["expected"], "n": r["n_heldout"], "range": p1["null_range"],
                                        "what": "expected without copying (below the held-out 1st-percentile "
                                                "threshold, for this many held-out images)"}})
        else:
            flat.append(r)
    return flat


def evaluate(o: Options, out_dir: Path | None = None) -> dict:
    """Every requested metric; with out_dir, metrics.json is rewritten after each metric family, so a crash or
    a kill later on keeps what was computed (FID can take minutes)."""
    t0 = time.perf_counter()
    device = M.device_of(o.device)
    synth, real = load_sets(o)
    print(f"synthetic: {len(synth)} images from {synth.root}; "
          + (f"real: {len(real)} images from {real.root}; " if real is not None else "no real set; ")
          + f"{shape_text(synth.images.shape[2:])}, on {device}")
    wanted = set(o.metrics) - {"all"}
    vocab = None
    if "region_intensity" in wanted or "all" in o.metrics:
        from medgen.eval.obj_eval.utility.data import mask_vocabulary
        vocab = mask_vocabulary([o.synthetic_dir], o.labels)
        if not vocab.binary and real is not None:
            wanted.add("region_intensity")
    if "all" in o.metrics and real is not None:
        from medgen.eval.obj_eval.core.inpainting import is_inpainted
        if is_inpainted(o.synthetic_dir):
            wanted.add("inpainting")
    lpips_net = None
    if "lpips" in wanted:
        try:
            lpips_net = load_lpips(o.lpips_net, o.weights.get(o.lpips_net), o.weights_sha256.get(o.lpips_net))
        except UserError as err:
            lpips_net = str(err)
    grid = volume_grid(synth)
    result = {"synthetic_dir": str(Path(o.synthetic_dir).resolve()),
              "real_dir": str(Path(o.real_dir).resolve()) if real is not None else None,
              "n_synthetic": len(synth), "n_real": len(real) if real is not None else 0, "image_size": int(synth.images.shape[-1]),
              **({"volume_shape": grid} if grid else {}),
              "image_type": o.image_type, "positive_only": o.positive_only, "seed": o.seed, "metrics": []}
    families = []
    if "fid" in wanted:
        families.append(lambda: fid_records(o, synth, real, device))
    if "quality" in o.modes and wanted & {"mae", "psnr", "ms_ssim", "lpips"}:
        families.append(lambda: pair_records(o, synth, real, device, wanted, lpips_net))
    if "diversity" in o.modes and wanted & {"ms_ssim", "lpips"}:
        families.append(lambda: diversity_records(o, synth, real, device, wanted, lpips_net))
    if wanted & set(DOWNSTREAM_METRICS):
        families.append(lambda: downstream_records(o, wanted, device, grid))
    if "inpainting" in wanted:
        from medgen.eval.obj_eval.core.inpainting import inpainting_records
        families.append(lambda: guarded_list("inpainting", lambda: inpainting_records(synth, real, o.seed)))
    if "region_intensity" in wanted:
        from medgen.eval.obj_eval.core.regions import region_intensity_records
        families.append(lambda: guarded_list("region_intensity", lambda: region_intensity_records(
            o.synthetic_dir, o.real_dir, vocab, int(synth.images.shape[-1]), o.layout, o.compute, o.seed)))
    for family in families:
        result["metrics"] += family()
        if out_dir is not None:
            write_metrics_json(result, out_dir)
    for r in result["metrics"]:
        if r.get("available") is False:
            print(f"{r['metric']}: unavailable: {r['reason']}", file=sys.stderr)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return {**result, "_sets": (synth, real)}


def write_metrics_json(result: dict, out_dir: Path) -> Path:
    """metrics.json, merged with the one already there when it compares the same two folders: records of the
    metrics computed now replace theirs, the others are kept (single-metric scripts run one after another)."""
    path = Path(out_dir) / "metrics.json"
    merged = {k: v for k, v in result.items() if k != "_sets"}
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    if old.get("synthetic_dir") == merged["synthetic_dir"] and old.get("real_dir") == merged["real_dir"]:
        now = {r["metric"] for r in merged["metrics"]}
        merged["metrics"] = [r for r in old.get("metrics", []) if r.get("metric") not in now] + merged["metrics"]
    return atomic_write_text(path, json.dumps(merged, indent=2, allow_nan=False, default=float))


def claim_output(o: Options, out: Path) -> Path:
    """The evaluation's --output folder (common/outputs.py): new, empty or an earlier evaluation's, apart from
    the real data; a sub-folder of the synthetic set it evaluates (the default, SYNTHETIC/eval) is allowed."""
    return claim(out, "evaluation", "--output", {"--synthetic-dir": o.synthetic_dir, "--real-dir": o.real_dir,
                                                "--real-train-dir": o.real_train_dir},
                 own=("metrics.json",), nest_ok=("--synthetic-dir",) + (("--real-dir",) if o.real_dir and
                 Path(o.real_dir).resolve() == Path(o.synthetic_dir).resolve() else ()))


def write_outputs(result: dict, out_dir: Path) -> list[Path]:
    from medgen.eval.obj_eval.core.report import markdown, plot_metrics, plot_samples
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = result.pop("_sets", None)
    paths = [write_metrics_json(result, out_dir)]
    result = json.loads(paths[0].read_text())  # the report shows every metric the file now holds
    paths.append(atomic_write_text(out_dir / "report.md", markdown(result)))
    paths.append(plot_metrics(result, out_dir / "metrics.png"))
    if sets is not None and sets[1] is not None:
        paths.append(plot_samples(*sets, out_dir / "samples.png"))
    return paths
