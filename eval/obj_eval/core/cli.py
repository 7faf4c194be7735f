"""Shared flags of the evaluation scripts (every flag also takes the other spelling: --real-dir/--real_dir)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from medgen.common.args import Int, SEED
from medgen.common.cli import add_flag as _add
from medgen.common.errors import UserError

if TYPE_CHECKING:
    from medgen.eval.obj_eval.core.evaluate import Options


def add_flag(p, name: str, **kw):
    _add(p, name.replace("-", "_"), **kw)


def add_input_flags(p: argparse.ArgumentParser, real_required: bool = True) -> None:
    add_flag(p, "synthetic-dir", required=True, metavar="DIR", help="generated dataset (NIfTI subjects or image folder)")
    add_flag(p, "real-dir", required=real_required, metavar="DIR",
             help="real dataset, any layout the training loaders read" +
             ("" if real_required else " (diversity: optional, gives the real-vs-real reference)"))
    add_flag(p, "image-type", default="bravo", help="modality compared (bravo, t1_pre, t1_gd, seg, ...)")
    add_flag(p, "image-size", type=Int(8, 4096), default=None, help="evaluation size (default: the synthetic images')")
    add_flag(p, "layout", default="original", choices=("original", "brats2021", "brats2023"), help="NIfTI naming")
    add_flag(p, "labels", default=None, choices=("binary", "brats2021", "brats2023"),
             help="the masks' label vocabulary (label maps: per-region faithfulness and intensities); default: the "
                  "synthetic folder's generation.json, else binary")
    add_flag(p, "positive-only", action="store_true", help="only slices with mask voxels")
    add_flag(p, "spatial-dims", type=Int(2, 3), default=2, choices=(2, 3),
             help="3: compare whole volumes (2.5D FID per plane and mean, 3D MS-SSIM, MAE/PSNR per volume)")
    add_flag(p, "volume-shape", default=None, metavar="H,W,D",
             help="--spatial-dims 3: the grid both sets are read on (default: the synthetic volumes')")
    add_flag(p, "device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    add_flag(p, "batch-size", type=Int(1, 4096), default=64, help="images per network pass")
    add_flag(p, "seed", type=SEED, default=0, help="pair sampling, bootstrap and real-set halves")
    add_flag(p, "output", default=None, metavar="DIR", help="where metrics.json and the report go "
                                                           "(default: <synthetic-dir>/eval)")
    add_flag(p, "no-floor", action="store_true", help="skip the real-vs-real reference")
    add_flag(p, "skip-bad", action="store_true", help="NIfTI sets: leave out subjects whose files fail the scan")
    add_flag(p, "compute", default="auto", choices=("auto", "local", "cluster"),
             help="where the caches live (config/paths.py); auto: cluster when MEDGEN_DATA_ROOT and "
                  "MEDGEN_OUTPUT_ROOT are set")


def add_fid_flags(p, many: bool) -> None:
    add_flag(p, "feature-network", default="inception,radimagenet" if many else "inception",
             help="inception and/or radimagenet (comma list)")
    add_flag(p, "bootstrap", type=Int(0, 10**6), default=50, help="bootstrap resamples for the FID interval")


def add_weight_flags(p, kinds: tuple[str, ...]) -> None:
    if len(kinds) == 1:
        add_flag(p, "weights", default=None, metavar="PATH", help=f"{kinds[0]} weights file")
        add_flag(p, "weights-sha256", default=None, help="pin the weights file's full SHA-256")
        return
    for k in kinds:
        add_flag(p, f"{k}-weights", default=None, metavar="PATH", help=f"{k} weights file")
        add_flag(p, f"{k}-sha256", default=None, help=f"pin the {k} file's full SHA-256")


def options(args, metrics: str, weights_kind: str | None = None, **extra) -> Options:
    """Options from parsed flags; weights_kind names the network a single-metric script's --weights is for."""
    from medgen.eval.obj_eval.core.evaluate import Options, parse_metrics   # here: --help runs without torch
    from medgen.eval.obj_eval.core.inputs import parse_volume_shape
    from medgen.eval.obj_eval.core.networks import check_fid_network
    if args.real_dir is None and "quality" in extra.get("modes", ("quality",)):
        raise UserError("--real-dir is needed for --mode quality (pairs of synthetic and real images)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.image_size is not None and args.image_size < 8:
        raise UserError("--image-size must be at least 8")
    volume = parse_volume_shape(args.volume_shape, args.spatial_dims)
    nets = tuple(n.strip() for n in getattr(args, "feature_network", "inception").split(",") if n.strip())
    for n in nets:
        check_fid_network(n)
    weights, shas = {}, {}
    if weights_kind is not None:
        weights[weights_kind], shas[weights_kind] = args.weights, args.weights_sha256
    for k in ("inception", "radimagenet", "alex", "vgg"):
        if getattr(args, f"{k}_weights", None):
            weights[k] = getattr(args, f"{k}_weights")
        if getattr(args, f"{k}_sha256", None):
            shas[k] = getattr(args, f"{k}_sha256")
    return Options(synthetic_dir=args.synthetic_dir, real_dir=args.real_dir, metrics=parse_metrics(metrics),
                   image_type=args.image_type, image_size=args.image_size, positive_only=args.positive_only,
                   layout=args.layout, feature_networks=nets, weights=weights, weights_sha256=shas,
                   bootstrap=getattr(args, "bootstrap", 50), batch_size=args.batch_size, device=args.device,
                   seed=args.seed, floor=not args.no_floor and args.real_dir is not None, output=args.output,
                   skip_bad=args.skip_bad, compute=args.compute, spatial_dims=args.spatial_dims, labels=args.labels,
                   volume_shape=volume, **extra)


def run(opts: Options, strict: bool) -> int:
    """Evaluate, write metrics.json + report.md + plots, print the table. strict (the single-metric scripts):
    an unavailable metric is an error naming the reason."""
    import json
    from pathlib import Path

    from medgen.eval.obj_eval.core.evaluate import claim_output, evaluate, write_outputs
    from medgen.eval.obj_eval.core.report import markdown
    out = claim_output(opts, Path(opts.output) if opts.output else Path(opts.synthetic_dir) / "eval")
    result = evaluate(opts, None if strict else out)
    missing = [r for r in result["metrics"] if r.get("available") is False]
    if strict and missing and len(missing) == len(result["metrics"]):
        raise UserError(missing[0]["reason"])
    paths = write_outputs(result, out)
    print(markdown(json.loads(paths[0].read_text())))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
