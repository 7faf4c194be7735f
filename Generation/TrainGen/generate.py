"""Build a synthetic dataset from trained models (resumable, sharded, with a provenance manifest).

    # masks from the seg model, then bravo images conditioned on them (chained pipeline)
    python Generation/TrainGen/generate.py --mode bravo --seg_model runs/seg_run --image_model runs/bravo_run \\
        --num_images 15000 --batch_size 256 --output_dir synth/bravo
    # condition on real masks instead (pairs for MAE/PSNR/LPIPS quality)
    python Generation/TrainGen/generate.py --image_model runs/bravo_run --masks_from data/test --output_dir synth/paired
    # class-conditional images with classifier-free guidance, balancing a dataset
    python Generation/TrainGen/generate.py --image_model runs/class_run --class_counts melanoma=5900 --guidance_scale 3
    # fill every minority class of a class folder up to the majority count; melanoma from its own fine-tuned model
    python Generation/TrainGen/generate.py --image_model runs/class_run --balance data/isic \
        --class_model melanoma=runs/melanoma_finetuned --output_dir synth/isic_balanced

A model is a run folder (its best.pt, else its latest checkpoint; EMA weights) or a checkpoint file. Re-running
the same command continues where it stopped. Under torchrun, or with --shard i/n in a SLURM array, the
indices are divided among processes; the manifest is merged when each finishes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medgen.common.args import BIG, Int, Real, SEED  # noqa: E402
from medgen.common.cli import HelpFormatter, add_flag  # noqa: E402
from medgen.Generation.TrainGen.core.plugins import load_plugins  # noqa: E402
from medgen.common.errors import UserError, run_main, shape_text  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=HelpFormatter)
    add_flag(p, "mode", default=None, help="seg, bravo, dual or class (default: the image model's, else seg)")
    add_flag(p, "strategy", default=None, help="must match the checkpoints (default: theirs)")
    add_flag(p, "seg_model", default=None, metavar="RUN", help="mask model: run folder or checkpoint file")
    add_flag(p, "image_model", default=None, metavar="RUN", help="image model (bravo, dual or class)")
    add_flag(p, "num_images", type=Int(1, BIG), default=None, help="samples to make (default: one per real mask with "
                                                           "--masks_from; the sum of --class_counts)")
    add_flag(p, "num_steps", type=Int(-BIG, BIG), default=None,
             help="sampling steps (default: the run's strategy.sample_steps, as its validation grids; unset there: "
                  "1000 ddpm, 50 ddim, 20 dpmpp_2m, 30 euler, 15 heun)")
    add_flag(p, "sampler", default=None, help="ddpm, ddim or dpmpp_2m (DDPM models), euler or heun (RFlow models); "
                                               "the image model's, or the seg model's in seg mode")
    add_flag(p, "seg_sampler", default=None, help="the seg model's sampler in a chained run (default: its strategy's)")
    add_flag(p, "seg_num_steps", type=Int(-BIG, BIG), default=None, help="the seg model's steps in a chained run")
    add_flag(p, "batch_size", type=Int(1, 4096), default=64, help="samples per batch; does not change any sample")
    add_flag(p, "output_dir", required=True, metavar="DIR", help="the synthetic dataset (re-running continues it)")
    add_flag(p, "seed", type=SEED, default=0, help="sample i uses seeds derived from (seed, i)")
    add_flag(p, "guidance_scale", type=Real(0, 100), default=None, help="class mode: classifier-free guidance scale")
    add_flag(p, "masks_from", default=None, metavar="DIR",
             help="condition on the real masks of this NIfTI dataset (slices with mask voxels) instead of generated ones")
    add_flag(p, "class_counts", default=None, metavar="NAME=N,...",
             help="class mode: images per class; none=N draws N unconditional images (the null label)")
    add_flag(p, "balance", default=None, metavar="DATA_DIR",
             help="class mode: generate what each class of this class image folder (its train/ split when it has "
                  "one) or labels CSV lacks to reach the majority count (or --balance_to)")
    add_flag(p, "balance_to", type=Int(1, BIG), default=None, metavar="N", help="--balance: fill every class up to N images")
    add_flag(p, "reject_copies", action="store_true",
             help="redraw an image closer to a training image than the 1st percentile of the real validation images "
                  "(the memorization audit's criterion); needs the image model's training data on this machine")
    add_flag(p, "anonymize_sources", action="store_true",
             help="--masks_from: the manifest's condition column names each real slice by a keyed digest of its "
                  "subject folder's name (hospital exports name folders by MRN) instead of its path, with the site "
                  "key (MEDGEN_KEY_FILE, default ~/.config/medgen/unit-key); evaluation where that key is still "
                  "pairs samples with their real slices")
    add_flag(p, "class_model", action="append", default=[], metavar="NAME=RUN",
             help="class mode: draw class NAME with its own model (e.g. fine-tuned on that class); repeatable")
    add_flag(p, "png", action="store_true", help="also write a PNG per sample and modality")
    add_flag(p, "output_size", type=Int(8, 4096), default=None, help="resize outputs (bilinear images, nearest masks)")
    add_flag(p, "progression", action="store_true", help="write progression.png: the denoising trajectory of 4 samples")
    add_flag(p, "compile", action="store_true", help="torch.compile the networks")
    add_flag(p, "shard", default=None, metavar="I/N", help="take every N-th index starting at I (SLURM arrays)")
    add_flag(p, "device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    add_flag(p, "min_mask_area", type=Real(0, 1), default=0.0005,
             help="mask filter: smallest area, fraction of the image (and at least 4 pixels)")
    add_flag(p, "no_mask_filter", action="store_true",
             help="accept every generated mask, empty ones included (a smoke test of a young seg model)")
    add_flag(p, "max_mask_area", type=Real(0, 1), default=0.25, help="mask filter: largest area, fraction of the image")
    add_flag(p, "min_components", type=Int(0, 10_000), default=1, help="mask filter: fewest connected components")
    add_flag(p, "max_components", type=Int(0, 10_000), default=8, help="mask filter: most connected components")
    add_flag(p, "max_attempts", type=Int(-BIG, 100_000), default=20, help="masks drawn per sample before giving up")
    add_flag(p, "skip_bad", action="store_true", help="--masks_from: leave out subjects whose files fail the scan")
    add_flag(p, "images_from", default=None, metavar="DIR",
             help="segment these images with a segment-mode --image_model (NIfTI dataset, images/ + masks/ PNG "
                  "folders, or a folder of images); with ground-truth masks, Dice and IoU are reported")
    add_flag(p, "ensemble", type=Int(0, 1000), default=None, help="--images_from: samples averaged per image "
                                                         "(default: the model's mode.segment.ensemble)")
    add_flag(p, "inpaint_into", default=None, metavar="DIR",
             help="insert lesions into the real scans of DIR (NIfTI dataset or images/ + masks/): lesions from "
                  "--seg_model or the real label maps of --masks_from, regenerated by an inpaint-mode --image_model "
                  "(or RePaint with any image model of the scan's sequence); outside each lesion's region the scan "
                  "is kept exactly")
    add_flag(p, "min_lesion_area", type=Real(0, 1), default=0.0005, help="--inpaint_into: smallest lesion, fraction of "
                                                                      "the image")
    add_flag(p, "max_lesion_area", type=Real(0, 1), default=0.1, help="--inpaint_into: largest lesion, fraction of the "
                                                                  "image")
    add_flag(p, "inpaint_margin", type=Int(0, 1000), default=None,
             help="--inpaint_into: px regenerated around the lesion and kept clear of the brain's edge and the scan's "
                  "own tumour (default: the inpaint model's mode.inpaint.margin, else 2)")
    add_flag(p, "allow_overlap", action="store_true", help="--inpaint_into: lesions may cover the scan's own tumour")
    add_flag(p, "repaint_jumps", type=Int(0, 1000), default=None,
             help="--inpaint_into: RePaint's resampling jumps per step (default: an inpaint model's "
                  "mode.inpaint.jumps, 1; any other model 5)")
    add_flag(p, "inpaint_replace", default=None, choices=("every", "end"),
             help="--inpaint_into: the known pixels replace the sample's after every step, or only at the end "
                  "(default: an inpaint model's mode.inpaint.replace; any other model every)")
    add_flag(p, "compute", default="auto", choices=("auto", "local", "cluster"),
             help="where the slice cache lives (config/paths.py); auto: cluster when MEDGEN_DATA_ROOT and "
                  "MEDGEN_OUTPUT_ROOT are set")
    add_flag(p, "plugin", action="append", default=[], metavar="FILE.py",
             help="a Python file registering the strategies or modes the checkpoints were trained with")
    return p.parse_args(argv)


def check_counts(args, flags) -> None:
    """Counts that must be positive, and an --output_dir that can be a folder: before any model is loaded."""
    for flag in flags:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise UserError(f"--output_dir {args.output_dir}: exists and is not a folder")


def build_job(args, rt):
    from medgen.Generation.TrainGen.core.generate import Job, split_work
    from medgen.Generation.TrainGen.core.generation.conditions import (MaskFilter, load_real_conditions, parse_class_counts,
                                                                 parse_class_models)
    from medgen.Generation.TrainGen.core.generation.models import load_model
    check_counts(args, ("batch_size", "num_images", "num_steps", "seg_num_steps", "max_attempts"))
    if args.output_size is not None and args.output_size < 8:
        raise UserError("--output_size must be at least 8")
    class_paths = parse_class_models(args.class_model)
    if not args.seg_model and not args.image_model and not class_paths:
        raise UserError("give --seg_model RUN and/or --image_model RUN")
    if args.balance_to is not None and not args.balance:
        raise UserError("--balance_to needs --balance DATA_DIR")
    if args.balance and args.class_counts:
        raise UserError("--balance computes the class counts; leave --class_counts out")
    if class_paths and not (args.balance or args.class_counts):
        raise UserError("--class_model needs --balance DATA_DIR or --class_counts (how many images of each class)")
    load = lambda path, flag, sampler, steps: load_model(path, flag, rt.device, args.strategy,  # noqa: E731
                                                         sampler, steps, args.compile)
    image_path, image_flag = ((args.image_model, "--image_model") if args.image_model else
                              (next(iter(class_paths.values()), None), "--class_model"))
    image = load(image_path, image_flag, args.sampler, args.num_steps) if image_path else None
    if image is not None and image.mode.makes_masks:
        raise UserError(f"--image_model {image.path} is a seg model; pass it as --seg_model")
    if image is not None and image.mode.needs == "image":
        raise UserError(f"--image_model {image.path} segments images (mode {image.meta['mode']!r}): give the images "
                        "with --images_from DIR")
    if image is not None and args.mode and args.mode != image.meta["mode"]:
        raise UserError(f"--mode {args.mode} contradicts --image_model {image.path}, which was trained for mode "
                        f"{image.meta['mode']!r}")
    if args.mode and image is None and args.seg_model is None:
        raise UserError(f"--mode {args.mode} needs --image_model RUN")
    seg = None
    if args.seg_model:
        if image is not None and image.mode.needs != "mask":
            raise UserError(f"--seg_model supplies masks to mask-conditioned models; --image_model {image.path} "
                            f"(mode {image.meta['mode']!r}) is conditioned on {image.mode.needs or 'nothing'}")
        chained = image is not None
        seg = load(args.seg_model, "--seg_model", args.seg_sampler if chained else args.sampler,
                   args.seg_num_steps if chained else args.num_steps)
        if not seg.mode.makes_masks:
            raise UserError(f"--seg_model {seg.path} was trained for mode {seg.meta['mode']!r}, not seg "
                            "(a model of unconditional masks)")
    main = image or seg
    for m in (image, seg):
        note = sampler_note(m)
        if note:
            print(f"note: {note}")
    if args.mode and args.mode != main.meta["mode"]:
        raise UserError(f"--mode {args.mode} needs --image_model RUN (--seg_model {main.path} makes "
                        f"{main.meta['mode']!r} masks)")
    mode, name = main.mode, main.meta["mode"]
    for flag, given in (("--class_counts", args.class_counts), ("--balance", args.balance),
                        ("--class_model", class_paths)):
        if given and mode.needs != "label":
            raise UserError(f"{flag} applies to --mode class only (modes conditioned on a class label)")
    if mode.needs == "mask" and seg is None and not args.masks_from:
        raise UserError(f"--mode {name} needs masks: --seg_model RUN (generated) or --masks_from DIR (real)")
    if mode.needs == "roles" and not args.masks_from:
        raise UserError(f"--mode {name} is conditioned on {', '.join(mode.condition_roles)}: give a real dataset "
                        "holding them with --masks_from DIR")
    if args.masks_from and mode.needs not in ("mask", "roles"):
        raise UserError(f"--masks_from gives real conditioning (masks or other modalities); mode {name} is "
                        f"conditioned on {mode.needs or 'nothing'}")
    if args.guidance_scale is not None and mode.needs != "label":
        raise UserError("--guidance_scale applies to --mode class only (modes conditioned on a class label)")
    if seg is not None and image is not None and seg.mode.vocab != image.mode.vocab:
        raise UserError(f"--seg_model {seg.path} makes masks of the vocabulary {seg.mode.vocab.describe()}; "
                        f"--image_model {image.path} is conditioned on {image.mode.vocab.describe()} (data.labels)")
    if seg is not None and image is not None and seg.cfg.data.shape != image.cfg.data.shape:
        raise UserError(f"--seg_model makes {shape_text(seg.cfg.data.shape)} masks but --image_model expects "
                        f"{shape_text(image.cfg.data.shape)}")
    if (image or seg).cfg.data.spatial_dims == 3:
        for flag, given in (("--output_size", args.output_size), ("--reject_copies", args.reject_copies)):
            if given:
                raise UserError(f"{flag} works on 2D samples; this model makes volumes")
    worker, workers = split_work(args.shard, rt.rank, rt.world)
    job = Job(mode=name, output_dir=Path(args.output_dir), num_images=args.num_images or 0,
              batch_size=args.batch_size, seed=args.seed, image_model=image, seg_model=seg,
              guidance=args.guidance_scale, masks_from=args.masks_from, class_counts=args.class_counts,
              mask_filter=MaskFilter(args.min_mask_area, args.max_mask_area, args.min_components, args.max_components,
                                     not args.no_mask_filter),
              max_attempts=args.max_attempts, output_size=args.output_size, png=args.png,
              progression=args.progression, worker=worker, workers=workers, device=rt.device, autocast=rt.autocast,
              anonymize_sources=args.anonymize_sources)
    if args.masks_from:
        job.use_real_conditions(args.masks_from, *load_real_conditions(args.masks_from, image, skip_bad=args.skip_bad,
                                                                       compute=args.compute))
        job.num_images = args.num_images or len(job.real_sources)
    if mode.needs == "label":
        plan_classes(job, args, class_paths, image_path, load)
        names = job.class_names()
        if job.class_counts:
            job.class_plan = parse_class_counts(job.class_counts, names, image.cfg.mode.labels.cfg_dropout > 0)
            if args.num_images and args.num_images != len(job.class_plan):
                raise UserError(f"--num_images {args.num_images} differs from the {len(job.class_plan)} images "
                                "--class_counts asks for (leave --num_images out)")
            job.num_images = len(job.class_plan)
        elif args.num_images:
            job.class_plan = [i % len(names) for i in range(args.num_images)]
    if not job.num_images:
        raise UserError("--num_images is required")
    if args.reject_copies:
        if mode.makes_masks:
            raise UserError("--reject_copies applies to image modes (the generated images are compared with the "
                            "training images); seg mode makes masks")
        from medgen.Generation.TrainGen.core.generation.copies import CopyCheck
        job.copy_check = CopyCheck.for_model(job.main_model)
        print(f"reject copies: copy distance threshold {job.copy_check.threshold:.4f} (1st-percentile order statistic "
              f"of {job.copy_check.n_heldout} validation images' distances to {job.copy_check.n_train} training "
              "images; moves of up to 2 px and mirroring count as copies)")
    return job


def sampler_note(model) -> str | None:
    """A line when this generation samples differently from the run's validation grids (which use the run's
    configured sampler and steps): a young model can look sharp in its grid and noisy under a fast sampler."""
    if model is None:
        return None
    grid = model.strategy.check_sampler(model.cfg.strategy.sampler)
    from medgen.Generation.TrainGen.core.generation.models import run_steps
    grid_steps = run_steps(model.cfg, model.strategy, grid)
    if (grid, grid_steps) == (model.sampler, model.steps):
        return None
    return (f"{model.path}: its validation grids were drawn with {grid}-{grid_steps}, this run samples with "
            f"{model.sampler}-{model.steps}; a briefly trained model can look much worse with fewer steps "
            f"(--sampler {grid} --num_steps {grid_steps} reproduces the grids)")


def plan_classes(job, args, class_paths: dict[str, str], image_path, load) -> None:
    """--balance and --class_model: the classes to draw, how many of each, and the model of each class."""
    from medgen.Generation.TrainGen.core.generate import model_classes
    from medgen.Generation.TrainGen.core.generation.conditions import balance_counts
    main = job.image_model
    for name, path in class_paths.items():
        model = main if path == image_path else load(path, "--class_model", args.sampler, args.num_steps)
        if model.mode.needs != "label":
            raise UserError(f"--class_model {name}={path}: a {model.meta['mode']!r} model, not a class model")
        if name not in model_classes(model):
            raise UserError(f"--class_model {name}={path}: the model has no class {name!r} (its classes: "
                            f"{', '.join(model_classes(model))})")
        if model.cfg.data.shape != main.cfg.data.shape:
            raise UserError(f"--class_model {name}={path} makes {shape_text(model.cfg.data.shape)} images, the "
                            f"other model {shape_text(main.cfg.data.shape)}")
        if model.meta.get("image_channels") != main.meta.get("image_channels"):
            raise UserError(f"--class_model {name}={path} makes {model.meta.get('image_channels')}-channel images, "
                            f"the other model {main.meta.get('image_channels')}-channel ones: a set mixing grey and "
                            "colour images hands a classifier the class for free")
        job.class_models[name] = model
    drawable = set(class_paths) | (set(model_classes(main)) if args.image_model else set())
    if args.balance:
        names, have, need = balance_counts(args.balance, args.balance_to)
        unknown = sorted(set(class_paths) - set(names))
        if unknown:
            raise UserError(f"--class_model {unknown[0]}: not a class of --balance {args.balance} "
                            f"(its classes: {', '.join(names)})")
        missing = [n for n in names if need[n] and n not in drawable]
        if missing:
            raise UserError(f"--balance: no model draws class {missing[0]!r} (give --class_model "
                            f"{missing[0]}=RUN, or an --image_model that knows it)")
        job.class_list = names
        job.class_counts = ",".join(f"{n}={need[n]}" for n in names if need[n])
        print("balance: " + ", ".join(f"{n} {have[n]} + {need[n]}" for n in names))
    else:
        job.class_counts = args.class_counts
        if class_paths:
            job.class_list = sorted(drawable)


def segment_images(args, rt) -> int:
    """--images_from: masks (+ mean and uncertainty) for new images with a segment-mode model."""
    from medgen.Generation.TrainGen.core.generation.models import load_model
    from medgen.Generation.TrainGen.core.segment_images import read_images, segment
    if not args.image_model or args.seg_model:
        raise UserError("--images_from needs --image_model RUN (a segment-mode model) and no --seg_model")
    if args.anonymize_sources:   # the masks are written under the images' own names: nothing here is anonymous
        raise UserError("--anonymize_sources does not apply to --images_from: each mask is written under its "
                        "image's name (volumes/<subject>/, manifest.csv, segmentation.md); rename the images "
                        "first if their names identify patients")
    check_counts(args, ("num_steps", "ensemble", "batch_size"))
    model = load_model(args.image_model, "--image_model", rt.device, args.strategy, args.sampler, args.num_steps,
                       args.compile)
    if model.mode.needs != "image":
        raise UserError(f"--image_model {model.path} was trained for mode {model.meta['mode']!r}, which does not "
                        "segment images (train one with --mode segment)")
    images = read_images(args.images_from, model, args.skip_bad, args.compute)
    ensemble = args.ensemble or model.cfg.mode.segment.ensemble
    rt.print(f"segmenting {len(images.sources)} images from {args.images_from} into {args.output_dir} "
             f"({model.strategy.name}/{model.sampler}, {model.steps} steps, ensemble {ensemble})")
    summary = segment(model, images, Path(args.output_dir), ensemble, args.batch_size, args.seed, rt.device,
                      rt.autocast)
    rt.print(f"{summary['images']} masks in {args.output_dir}"
             + (f"; Dice {summary['dice_mean']:.4f}, IoU {summary['iou_mean']:.4f} (mean over images)"
                if "dice_mean" in summary else "") + "; segmentation.md")
    return 0


def insert_lesions(args, rt) -> int:
    """--inpaint_into: lesions inserted into real scans (core/inserting.py)."""
    from medgen.Generation.TrainGen.core.generate import Job, content_digest, run_job, split_work, throughput_line
    from medgen.Generation.TrainGen.core.generation.conditions import MaskFilter
    from medgen.Generation.TrainGen.core.generation.models import load_model
    from medgen.common.splits import source_unit_digest
    from medgen.Generation.TrainGen.core import inserting as I
    check_counts(args, ("batch_size", "num_images", "num_steps", "max_attempts", "repaint_jumps"))
    if not args.image_model or bool(args.seg_model) == bool(args.masks_from):
        raise UserError("--inpaint_into needs --image_model RUN and the lesions from exactly one of --seg_model RUN "
                        "(generated) or --masks_from DIR (real label maps)")
    if args.inpaint_margin is not None and args.inpaint_margin < 0:
        raise UserError("--inpaint_margin must be at least 0")
    if not 0 < args.min_lesion_area <= args.max_lesion_area <= 1:
        raise UserError("--min_lesion_area and --max_lesion_area must satisfy 0 < min <= max <= 1")
    load = lambda path, flag, sampler, steps: load_model(path, flag, rt.device, args.strategy,  # noqa: E731
                                                         sampler, steps, args.compile)
    image = load(args.image_model, "--image_model", args.sampler, args.num_steps)
    mode = image.mode
    if mode.needs not in ("inpaint", "mask", None) or len(mode.generated_roles) != 1 or mode.makes_masks:
        raise UserError(f"--inpaint_into: --image_model {image.path} (mode {image.meta['mode']!r}) does not generate "
                        "one image sequence from nothing or from a mask; use an inpaint, image or bravo model")
    seg = None
    if args.seg_model:
        seg = load(args.seg_model, "--seg_model", args.seg_sampler, args.seg_num_steps)
        if not seg.mode.makes_masks:
            raise UserError(f"--seg_model {seg.path} was trained for mode {seg.meta['mode']!r}, not seg")
        if seg.mode.vocab != mode.vocab or seg.cfg.data.shape != image.cfg.data.shape:
            raise UserError(f"--seg_model {seg.path} makes {shape_text(seg.cfg.data.shape)} masks of "
                            f"{seg.mode.vocab.describe()}; --image_model {image.path} takes "
                            f"{shape_text(image.cfg.data.shape)} ones of {mode.vocab.describe()}")
    scans = I.read_scans(args.inpaint_into, image, args.skip_bad, args.compute)
    I.check_scans(scans, image, args.inpaint_into)
    margin = args.inpaint_margin if args.inpaint_margin is not None else (
        image.cfg.mode.inpaint.margin if mode.needs == "inpaint" else 2)
    own = image.cfg.mode.inpaint if mode.needs == "inpaint" else None
    jumps = args.repaint_jumps or (own.jumps if own else 5)
    every = (args.inpaint_replace or (own.replace if own else "every")) == "every"
    inserter = I.Inserter(scans, I.Placement(args.min_lesion_area, args.max_lesion_area, margin, args.max_attempts,
                                             args.allow_overlap), jumps=jumps, replace_every=every, seed=args.seed)
    if args.masks_from:
        inserter.bank, inserter.bank_keys = I.lesion_bank(args.masks_from, image, args.skip_bad, args.compute)
    worker, workers = split_work(args.shard, rt.rank, rt.world)
    job = Job(mode=image.meta["mode"], output_dir=Path(args.output_dir),
              num_images=args.num_images or len(scans.sources), batch_size=args.batch_size, seed=args.seed,
              image_model=image, seg_model=seg,
              masks_from=str(Path(args.masks_from).resolve()) if args.masks_from else None,
              mask_filter=MaskFilter(args.min_mask_area, args.max_mask_area, args.min_components, args.max_components,
                                     not args.no_mask_filter),
              max_attempts=args.max_attempts, png=args.png, worker=worker, workers=workers, device=rt.device,
              autocast=rt.autocast, anonymize_sources=args.anonymize_sources, extra_roles=["seg", I.REGION_ROLE],
              inpaint=inserter.settings(args.inpaint_into),
              source_units=sorted({source_unit_digest(s)[1] for s in scans.sources}),
              contents={"--inpaint_into": content_digest(scans.sources, scans.images, scans.labels),
                        **({"--masks_from": content_digest(inserter.bank_keys, inserter.bank)}
                           if args.masks_from else {})})
    rt.print(f"inserting lesions into {len(scans.sources)} scans of {args.inpaint_into}: {job.num_images} samples "
             f"({'the inpaint model' if own else 'RePaint'}, {jumps} jump(s) per step, known pixels "
             f"{'after every step' if every else 'at the end'}, "
             f"{image.strategy.name}/{image.sampler}-{image.steps}; lesions from "
             f"{args.seg_model or args.masks_from})")
    summary = run_job(job, None, lambda chunk: inserter.batch(job, chunk))
    print(throughput_line(summary), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    load_plugins(args.plugin)
    from medgen.Generation.TrainGen.core.config import RuntimeConfig
    from medgen.Generation.TrainGen.core.generate import run_job, throughput_line
    from medgen.Generation.TrainGen.core.runtime import init_runtime, shutdown
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rt = init_runtime(RuntimeConfig(seed=args.seed, device=args.device, multi_gpu=distributed))
    try:
        if args.images_from:
            return segment_images(args, rt)
        if args.inpaint_into:
            return insert_lesions(args, rt)
        job = build_job(args, rt)
        rt.print(f"{job.mode}: {job.num_images} samples into {job.output_dir} "
                 f"({job.main_model.strategy.name}/{job.main_model.sampler}, {job.main_model.steps} steps"
                 + (f"; masks from {job.seg_model.path}" if job.chained_seg else "")
                 + f"; worker {job.worker + 1}/{job.workers} on {rt.device})")
        barrier = None
        if rt.distributed:
            import torch.distributed as dist
            barrier = dist.barrier
        summary = run_job(job, barrier)
        print(throughput_line(summary), flush=True)
        if "committed" in summary:
            missing = job.num_images - summary["committed"]
            rt.print(f"{summary['committed']} samples in {job.output_dir / 'manifest.csv'}"
                     + (f" ({missing} not yet made by other shards)" if missing > 0 else "")
                     + "; previews: " + ", ".join(Path(p).name for p in summary["previews"])
                     + (f"; {Path(summary['progression']).name}" if "progression" in summary else ""))
        return 0
    finally:
        shutdown(rt)


if __name__ == "__main__":
    run_main(main)
