"""Flags and the top level of run_utility.py; the downstream-model flags are shared with run_evaluation.py
(faithfulness, memorization and domain metrics train the same reference model)."""
from __future__ import annotations

DOC = """Does synthetic data help a downstream model? Train the same MONAI segmenter or classifier on real data, real
plus synthetic data (at several ratios), synthetic data alone and, for class data, real data balanced with
synthetic minority images; at several fractions of the real training data and several seeds; score every model
on the real test split only and compare each recipe with `real`, paired by seed and test subject.
Beside the study: mask faithfulness, a memorization audit and the Fréchet distance / precision-recall in the
downstream network's feature space (--audit).

    python eval/obj_eval/run_utility.py --real_dir data/brats --synthetic_dir synth/bravo \\
        --real_fraction 0.1,0.25,1 --synthetic_ratio 0.5,1,2 --seeds 3 --preset full --output results/utility

Writes <output>/utility.json (every number with N, seeds, CI and the recipe), utility.md (a verdict in words,
then tables) and PNGs; each trained model's scores go to <output>/results/ as it finishes, so a killed study
resumes where it stopped.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medgen.common.args import BIG, Int, Real, SEED
from medgen.common.cli import add_flag as _add
from medgen.common.outputs import claim
from medgen.common.errors import UserError
from medgen.common.fileio import atomic_write_text
from medgen.eval.obj_eval.utility import names as named

if TYPE_CHECKING:
    from medgen.eval.obj_eval.utility import models

AUDITS = ("faithfulness", "memorization", "domain")


def add_flag(p, name: str, **kw):
    _add(p, name.replace("-", "_"), **kw)


def add_downstream_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("downstream model (MONAI BasicUNet / ResNet)")
    add_flag(g, "preset", default="small", choices=tuple(named.PRESETS),
             help="network width and step budget: tiny (CPU, minutes), small, full (GPU)")
    add_flag(g, "max-steps", type=Int(1, BIG), default=None, help="training steps per model (default: the preset's)")
    add_flag(g, "epochs", type=Real(0, 1e6, low_open=True), default=None, help="instead of --max-steps: passes over each recipe's data")
    add_flag(g, "train-batch-size", type=Int(1, 4096), default=None, help="default: the preset's")
    add_flag(g, "lr", type=Real(0, 10, low_open=True), default=None, help="peak learning rate of the one-cycle schedule")
    add_flag(g, "val-every", type=Int(1, BIG), default=None, help="steps between validations on the real val split")
    add_flag(g, "patience", type=Int(0, BIG), default=5, help="early stopping: validations without improvement")
    add_flag(g, "no-bf16", action="store_true", help="CUDA: train in float32 instead of bf16 autocast")
    add_flag(g, "compile", action="store_true", help="CUDA: torch.compile the downstream network")
    add_split_flags(g)


def add_split_flags(p) -> None:
    add_flag(p, "split-seed", type=SEED, default=None,
             help="a flat real folder (no train/val folders): its split seed (default: the generator's, from the "
                  "synthetic folder's generation.json; else 0)")
    add_flag(p, "val-fraction", type=Real(0, 0.9), default=None,
             help="a flat real folder: its validation share (default: the generator's; else 0.2)")
    add_flag(p, "labels-csv", default=None, metavar="FILE",
             help="a flat real image folder: its labels CSV, the one the generator trained with "
                  "(--set data.labels_csv=FILE: filename,label; APTOS id_code,diagnosis; ISIC one-hot)")
    add_flag(p, "patient-pattern", default=None, metavar="REGEX",
             help="real image folders: a regex whose first group in each file name is its patient (e.g. "
                  "'^(P\\d+)_'): a flat folder is split by patient and the statistics resample patients "
                  "(default: the generator's data.patient_pattern)")


def train_settings(args, task: str, device: str) -> models.TrainSettings:
    from medgen.eval.obj_eval.utility import models
    for flag in ("max_steps", "train_batch_size", "val_every", "patience"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.epochs is not None and args.epochs <= 0:
        raise UserError("--epochs must be positive")
    return models.TrainSettings(task, args.preset, args.max_steps, args.epochs, args.train_batch_size, args.lr,
                                args.val_every, args.patience, device, not args.no_bf16, args.compile)


def resolve_device(name: str) -> str:
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def parser(doc: str) -> argparse.ArgumentParser:
    from medgen.common.cli import HelpFormatter
    p = argparse.ArgumentParser(description=doc, allow_abbrev=False, formatter_class=HelpFormatter)
    add_flag(p, "real-dir", required=True, metavar="DIR",
             help="real dataset with train/val[/test] splits (a missing test split is carved from val by subject)")
    add_flag(p, "synthetic-dir", action="append", default=[], metavar="DIR",
             help="synthetic dataset (generate.py output or any folder the loaders read); repeat for several")
    add_flag(p, "output", default=None, metavar="DIR", help="results (default: <first synthetic dir>/utility)")
    add_flag(p, "recipes", default=None,
             help=f"comma list of {', '.join(named.RECIPE_KINDS)} (default: real,real+synthetic,synthetic, "
                  "plus real+balanced for class data; a set of lesions inserted into real scans takes "
                  "real+inpainted, its own scans only, for real+synthetic)")
    add_flag(p, "synthetic-ratio", default="1", help="real+synthetic and real+inpainted: synthetic images per real "
                                                     "image (comma list)")
    add_flag(p, "real-fraction", default="1", help="fractions of the real training data (comma list)")
    add_flag(p, "seeds", type=Int(0, 1000), default=3, help="models per recipe and fraction (at least 2 for a CI)")
    add_flag(p, "seed", type=SEED, default=0, help="first seed (seeds are seed, seed+1, ...)")
    add_flag(p, "primary", default="auto", help="score of the verdict: auto (dice_subject; balanced_accuracy, or "
                                                "kappa_quadratic for ordinal grades) or one of " +
                                                ", ".join(dict.fromkeys(named.SEG_METRICS + named.SEG_METRICS_3D
                                                                        + named.CLASS_METRICS)))
    add_flag(p, "correction", default="holm", choices=named.CORRECTIONS,
             help="family-wise error control over the study's comparisons (every recipe x real fraction): holm "
                  "(adjusted p decides 'distinguishable'), or none (each comparison at alpha 0.05 on its own)")
    add_flag(p, "primary-comparison", default=None, metavar="RECIPE[@FRACTION]",
             help="one comparison declared before the study, tested alone at full alpha; the others form the "
                  "corrected family (the report says which)")
    add_flag(p, "ordinal", action="store_true",
             help="class data: the classes are ordered grades (automatic when every class name is an integer)")
    add_flag(p, "audit", default="all", help="sections beside the study: all, none, or a comma list of "
                                             + ", ".join(AUDITS) + " (faithfulness: segmentation only)")
    add_flag(p, "image-type", default="bravo", help="NIfTI data: the image channel(s), comma list (e.g. t1_pre,t1_gd)")
    add_flag(p, "image-size", type=Int(8, 4096), default=None, help="evaluation size (default: the synthetic images')")
    add_flag(p, "positive-only", action="store_true", help="NIfTI data: only slices with mask voxels")
    add_flag(p, "spatial-dims", type=Int(2, 3), default=2, choices=(2, 3),
             help="3: whole NIfTI volumes and a 3D BasicUNet (the grid: --volume-shape, default the synthetic set's)")
    add_flag(p, "volume-shape", default=None, metavar="H,W,D", help="--spatial-dims 3: the evaluation grid")
    add_flag(p, "layout", default="original", choices=("original", "brats2021", "brats2023"), help="NIfTI naming")
    add_flag(p, "labels", default=None, choices=("binary", "brats2021", "brats2023"),
             help="the masks' label vocabulary: label maps are scored per region (WT, TC, ET); default: the one the "
                  "synthetic folders' generation.json records, else binary")
    add_flag(p, "bootstrap", type=Int(0, 10**6), default=1000, help="resamples of the paired comparison")
    add_flag(p, "device", default="auto", choices=("auto", "cpu", "cuda"))
    add_flag(p, "compute", default="auto", choices=("auto", "local", "cluster"), help="where caches live")
    add_downstream_flags(p)
    return p


def eval_size(args) -> tuple[dict, object]:
    """({synthetic folder: native size}, the evaluation size: px, or an [H, W, D] grid with --spatial-dims 3)."""
    from medgen.eval.obj_eval.core.inputs import parse_volume_shape
    from medgen.eval.obj_eval.utility import data
    volume = parse_volume_shape(args.volume_shape, args.spatial_dims)
    if args.spatial_dims == 2:
        natives = data.native_sizes(args.synthetic_dir)
        return natives, args.image_size or data.default_size(natives, args.real_dir)
    from medgen.eval.obj_eval.core.inputs import native_volume_shape
    shape = volume or native_volume_shape(
        args.synthetic_dir[0] if args.synthetic_dir else args.real_dir,
        "--synthetic_dir" if args.synthetic_dir else "--real_dir")
    return {d: None for d in args.synthetic_dir}, shape


def parse_audits(text: str, task: str) -> list[str]:
    names = list(AUDITS) if text == "all" else [] if text == "none" else [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in AUDITS]
    if unknown:
        raise UserError(f"--audit: unknown section {unknown[0]!r} (choose all, none or from {', '.join(AUDITS)})")
    if task != "segmentation":
        if "faithfulness" in names and text != "all":
            raise UserError("--audit faithfulness needs a segmentation dataset (images with masks)")
        names = [a for a in names if a != "faithfulness"]
    return names


def main(argv=None, doc: str = DOC) -> int:
    args = parser(doc).parse_args(argv)
    from medgen.eval.obj_eval.core.inpainting import is_inpainted   # here: --help runs without torch
    from medgen.eval.obj_eval.utility import data, models, scores, study
    from medgen.eval.obj_eval.utility.sections import reference_cache, run_audits
    if args.seeds < 2:
        raise UserError("--seeds must be at least 2: the confidence intervals and paired comparisons are over seeds")
    if args.bootstrap < 100:
        raise UserError("--bootstrap must be at least 100")
    fractions = study.parse_list(args.real_fraction, "--real-fraction", high=1.0)
    ratios = study.parse_list(args.synthetic_ratio, "--synthetic-ratio")
    out = Path(args.output) if args.output else (Path(args.synthetic_dir[0]) / "utility" if args.synthetic_dir
                                                  else Path("utility"))
    device = resolve_device(args.device)
    roles = [r.strip() for r in args.image_type.split(",") if r.strip()]
    natives, size = eval_size(args)
    check_split_flags(args)
    generators = data.generator_records(args.synthetic_dir) if args.synthetic_dir else None
    vocab = data.mask_vocabulary(args.synthetic_dir, args.labels)
    real, notes = data.load_real(args.real_dir, size, roles, args.positive_only, args.layout, args.seed, args.compute,
                                 generators, args.split_seed, args.val_fraction, vocab=vocab,
                                 labels_csv=args.labels_csv, patient_pattern=args.patient_pattern)
    task = "classification" if real["train"].classes else "segmentation"
    ordinal = task == "classification" and (args.ordinal or scores.ordinal_classes(real["train"].classes))
    primary = choose_primary(args.primary, task, args.spatial_dims, ordinal, real["train"].classes,
                             () if vocab.binary else tuple(r for r, _ in vocab.regions))
    names = [Path(d).name for d in args.synthetic_dir]
    if len(set(names)) != len(names):
        raise UserError("--synthetic_dir: two folders share a name; the recipes are named after the folders")
    kinds = (args.recipes.split(",") if args.recipes else
             ["real", "real+synthetic", "synthetic"] + (["real+balanced"] if task == "classification" else []))
    recipes = study.build_recipes([k.strip() for k in kinds if k.strip()], names, ratios, task,
                                  frozenset(n for n, d in zip(names, args.synthetic_dir) if is_inpainted(d)))
    declared = study.parse_comparison(args.primary_comparison, recipes, fractions)
    synthetic = {n: data.load_synthetic(d, size, roles, real["train"], args.compute, natives[d])
                 for n, d in zip(names, args.synthetic_dir)}
    audits = parse_audits(args.audit, task) if synthetic else []
    settings = train_settings(args, task, device)
    for ts in list(real.values()) + list(synthetic.values()):
        print(data.describe(ts))
    for n in notes:
        print(f"note: {n}")
    edited = {n: ts.edited_from for n, ts in synthetic.items() if ts.edited_from}   # real+inpainted draws by them
    data_key = models.content_key(*(t for ts in list(real.values()) + list(synthetic.values())
                                    for t in (ts.images, ts.targets)), roles, size, scores.SCORES_VERSION,
                                  *([edited] if edited else []))
    seeds = list(range(args.seed, args.seed + args.seeds))
    # the first write, after every check: a refused study leaves no folder behind
    claim(out, "utility", "--output", {"--real-dir": args.real_dir, "--synthetic-dir": args.synthetic_dir},
          own=("utility.json",), nest_ok=("--synthetic-dir",))
    results = study.run_study(out, task, recipes, fractions, seeds, real, synthetic, settings, data_key,
                              reference_cache(args.compute) if audits else None)
    s = settings.resolved()
    unit = "subject" if task == "segmentation" else "image"
    summary = {"task": task, "primary": primary, "unit": unit, "ordinal": ordinal,
               "real_dir": str(Path(args.real_dir).resolve()),
               "synthetic_dirs": [str(Path(d).resolve()) for d in args.synthetic_dir], "image_size": size,
               "image_type": roles, "positive_only": args.positive_only, "notes": notes,
               "model": ("MONAI BasicUNet " if task == "segmentation" else "MONAI ResNet (basic blocks) ") +
                        f"preset {s.preset}",
               "training": (f"{s.epochs:g} epochs" if s.epochs else f"{s.max_steps} steps") +
                           f", batch {s.batch_size}, AdamW one-cycle lr {s.lr:g}, validation every {s.val_every} "
                           f"steps, patience {s.patience}, on {device}",
               "settings": s.key(), "seeds": seeds, "real_fractions": fractions, "bootstrap": args.bootstrap,
               "sets": {k: {"n": len(v), "units": len(set(v.units))} for k, v in {**real, **synthetic}.items()},
               "correction": args.correction, "primary_comparison": args.primary_comparison,
               "rows": study.summarise(results, recipes, fractions, primary, args.bootstrap, args.seed, unit,
                                       args.correction, declared)}
    summary["audit"] = run_audits(audits, real, synthetic, settings, args.seed, device, out, args.compute, notes)
    write(summary, out)
    return 0


def check_split_flags(args) -> None:
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")


def choose_primary(name: str, task: str, spatial_dims: int, ordinal: bool, classes: list[str],
                   regions: tuple[str, ...] = ()) -> str:
    """The verdict's score. Quadratic kappa weighs a disagreement by the distance between class numbers, which
    only means something for ordered grades (diabetic retinopathy 0-4): the default for those, refused for
    unordered classes, where balanced accuracy is the headline and kappa a secondary column."""
    if task == "segmentation":
        base = named.SEG_METRICS_3D if spatial_dims == 3 else named.SEG_METRICS
        allowed = tuple(base) + tuple(f"{m}_{r}" for r in regions for m in base)   # label maps: per region too
    else:
        allowed = named.CLASS_METRICS
    if name == "auto":
        return "dice_subject" if task == "segmentation" else "kappa_quadratic" if ordinal else "balanced_accuracy"
    if name not in allowed:
        raise UserError(f"--primary {name!r} is not a {task} score" + (" on volumes" if spatial_dims == 3 else "")
                        + f" (choose from {', '.join(allowed)})")
    if name == "kappa_quadratic" and not ordinal:
        raise UserError(f"--primary kappa_quadratic: the classes ({', '.join(classes)}) are not ordered grades; "
                        "quadratic kappa weighs disagreements by class distance, which means nothing for unordered "
                        "classes (use balanced_accuracy, or pass --ordinal if the class order is a grade)")
    return name


def downstream_options(args) -> dict:
    """TrainSettings fields from add_downstream_flags' flags."""
    train_settings(args, "segmentation", "cpu")   # the same checks
    check_split_flags(args)
    return {"preset": args.preset, "max_steps": args.max_steps, "epochs": args.epochs,
            "batch_size": args.train_batch_size, "lr": args.lr, "val_every": args.val_every,
            "patience": args.patience, "bf16": not args.no_bf16, "compile": args.compile}


def write(summary: dict, out: Path) -> None:
    from medgen.eval.obj_eval.utility import report
    out.mkdir(parents=True, exist_ok=True)
    plots = [report.plot_fractions(summary, out / "utility_scores.png")]
    plots += [Path(p) for r in summary["audit"] for p in r.get("plots", [])]
    summary["plots"] = [str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in plots]
    atomic_write_text(out / "utility.json", json.dumps(summary, indent=2, default=float))
    md = report.markdown(summary)
    atomic_write_text(out / "utility.md", md)
    print(md)
    print(f"wrote {out / 'utility.json'}, {out / 'utility.md'} and {len(plots)} plots", file=sys.stderr)
