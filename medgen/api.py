"""The Python API: the same jobs as the command lines, for notebooks and scripts.

    import medgen
    pipe = medgen.load("runs/bravo")                        # a run folder, a checkpoint or an exported folder
    out = pipe.sample(masks=".cache/demo/brain/test", seed=0)  # bravo images for the real test masks
    out.images["bravo"].shape                               # (N, 1, H, W), float in [0, 1] (decoded for latent runs)
    out.save("synth/api")                                   # the files generate.py writes, byte for byte

Sample i draws its noise from seeds derived from (seed, i), as in generate.py: the same seed gives the same
images here and there, whatever the batch size. Errors are medgen.UserError, one line naming the argument.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from medgen.common.args import BIG, SEED, STEPS, Flag, Int, Real, Text, validated
from medgen.common.data import MASK_ROLE
from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.generate import UNCONDITIONAL, Job, generate_batch, model_classes, run_job
from medgen.Generation.TrainGen.core.generation.conditions import MaskFilter, load_real_conditions
from medgen.Generation.TrainGen.core.generation.models import Model, load_model, run_steps
from medgen.Generation.TrainGen.core.runtime import Runtime, local_runtime


@validated(checked_inside=("path",), device=Text(("auto", "cpu", "cuda")), sampler=Text(optional=True),
           steps=STEPS, compile=Flag())
def load(path, device: str = "auto", sampler: str | None = None, steps: int | None = None,
         compile: bool = False) -> "Pipeline":
    """A trained model ready to sample: EMA weights, its strategy and mode, on `device` (auto: CUDA when there is
    one, bf16 autocast there). sampler/steps: the defaults of every sample() call (else the run's own)."""
    rt = local_runtime(device)
    return Pipeline(load_model(path, "medgen.load", rt.device, None, sampler, steps, compile), rt)


@dataclass
class Samples:
    """What one sample() call drew: images[role] is (N, C, H, W) (or (N, C, D, H, W)) in [0, 1] on the CPU, masks
    {0, 1}; rows[i] the manifest fields of sample i."""
    images: dict[str, torch.Tensor]
    rows: list[dict]
    job: Job | None = field(repr=False)
    results: dict = field(repr=False)
    saver: object = field(default=None, repr=False)   # segment models: generate.py --images_from's writer

    @validated(output_dir=Text(path=True))
    def save(self, output_dir: str | Path) -> Path:
        """Write the samples as generate.py does (NIfTI subject folders or class folders of PNGs, manifest.csv,
        generation.json, previews; for a segment model its masks, means and uncertainty maps); a folder made
        with other settings is refused, and re-saving is a no-op."""
        if self.saver is not None:
            self.saver(output_dir)        # recomputes the masks: each is a pure function of its seed
            return Path(output_dir)
        job = replace(self.job, output_dir=Path(output_dir))
        run_job(job, make=lambda chunk: {i: self.results[i] for i in chunk})
        return job.output_dir

    def __len__(self) -> int:
        return len(self.rows)


class Pipeline:
    """A loaded model (medgen.load). `mode`, `classes`, `shape` and `needs` say what sample() takes."""

    def __init__(self, model: Model, rt: Runtime):
        self.model, self.rt = model, rt

    @property
    def mode(self) -> str:
        return self.model.meta["mode"]

    @property
    def needs(self) -> str | None:
        """None, 'mask', 'roles', 'label' or 'image': what each sample is conditioned on."""
        return self.model.mode.needs

    @property
    def classes(self) -> list[str]:
        return model_classes(self.model) if self.needs == "label" else []

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.model.cfg.data.shape)

    def __repr__(self) -> str:
        return (f"Pipeline({self.model.path}: mode {self.mode}, {self.model.strategy.name}/{self.model.sampler}-"
                f"{self.model.steps}, {self.shape} on {self.rt.device})")

    def with_sampler(self, sampler: str | None, steps: int | None) -> Model:
        if sampler is None and steps is None:
            return self.model
        chosen = self.model.strategy.check_sampler(sampler or self.model.sampler)
        if steps is not None and steps < 1:
            raise UserError(f"steps must be at least 1, got {steps}")
        return replace(self.model, sampler=chosen,
                       steps=steps or (self.model.steps if sampler is None else run_steps(self.model.cfg,
                                                                                          self.model.strategy, chosen)))

    @validated(checked_inside=("masks", "labels", "images"), n=Int(1, BIG, optional=True, what="samples"),
               sampler=Text(optional=True), steps=STEPS, guidance=Real(0, 100, optional=True), seed=SEED,
               batch_size=Int(1, 4096), ensemble=Int(1, 1000, optional=True), mask_filter=Flag())
    def sample(self, n: int | None = None, *, masks=None, labels=None, images=None, sampler: str | None = None,
               steps: int | None = None, guidance: float | None = None, seed: int = 0, batch_size: int = 16,
               ensemble: int | None = None, mask_filter: bool = True) -> Samples:
        """Draw samples. What to pass depends on `needs`:
          None    n (seg masks pass generate.py's mask filter unless mask_filter=False)
          mask    masks: a (N, 1, H, W) tensor or array of {0, 1}, a NIfTI dataset folder (its masks, as
                  --masks_from), or the Pipeline of a seg model (generated masks, as --seg_model)
          roles   masks: the conditioning roles as a (N, C, H, W) tensor in [0, 1], or a NIfTI dataset folder
          label   labels: one class name per sample (None or 'none': unconditional), one name for all n, or
                  {name: count}; guidance: the CFG scale
          image   images: a (N, C, H, W) tensor in [0, 1] or a folder (as --images_from); ensemble samples each
        """
        model = self.with_sampler(sampler, steps)
        needs = self.needs
        given = {"masks": masks is not None, "labels": labels is not None, "images": images is not None}
        wanted = {"mask": "masks", "roles": "masks", "label": "labels", "image": "images"}.get(needs)
        for name, present in given.items():
            if present and name != wanted:
                raise UserError(f"{name}= does not apply to a {self.mode} model (it takes "
                                f"{wanted + '=' if wanted else 'n and no conditioning'})")
        if guidance is not None and needs != "label":
            raise UserError("guidance= applies to class-conditional models only")
        if needs == "image":
            return self._segment(model, images, seed, batch_size, ensemble)
        job = Job(mode=self.mode, output_dir=Path("."), num_images=n or 0, batch_size=batch_size, seed=seed,
                  image_model=model if not model.mode.makes_masks else None,
                  seg_model=model if model.mode.makes_masks else None, guidance=guidance,
                  mask_filter=MaskFilter(enabled=mask_filter), device=self.rt.device, autocast=self.rt.autocast)
        if needs in ("mask", "roles"):
            self._conditions(job, masks, n)
        elif needs == "label":
            self._labels(job, labels, n)
        if not job.num_images:
            raise UserError("n (the number of samples) is required")
        results = {}
        for start in range(0, job.num_images, batch_size):
            results.update(generate_batch(job, list(range(start, min(start + batch_size, job.num_images)))))
        roles = list(next(iter(results.values()))["arrays"])
        stacked = {r: torch.stack([results[i]["arrays"][r] for i in range(job.num_images)]) for r in roles}
        return Samples(stacked, [results[i]["row"] for i in range(job.num_images)], job, results)

    def _segment(self, model: Model, images, seed: int, batch_size: int, ensemble: int | None) -> Samples:
        """A segment model: masks (and the ensemble's mean and spread) for images, as generate.py --images_from."""
        from medgen.Generation.TrainGen.core.segment_images import ImageSet, read_images, segment, segment_batch
        if images is None:
            raise UserError("a segment model needs images= (a (N, C, H, W) tensor in [0, 1], or a folder)")
        if isinstance(images, (str, Path)):
            data = read_images(str(images), model, False, "auto")
        else:
            x = torch.as_tensor(images).float()
            x = x.unsqueeze(1) if x.dim() == len(self.shape) + 1 else x
            if tuple(x.shape[2:]) != self.shape or not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
                raise UserError(f"images= must be (N, C, {', '.join(map(str, self.shape))}) with values in [0, 1], "
                                f"got {tuple(x.shape)}")
            data = ImageSet(x, None, [f"image_{i:06d}.png" for i in range(len(x))], nifti=False)
        ensemble = ensemble or model.cfg.mode.segment.ensemble
        parts = [segment_batch(model, data.images, list(range(s, min(s + batch_size, len(data.sources)))),
                               ensemble, seed, self.rt.device, self.rt.autocast)
                 for s in range(0, len(data.sources), batch_size)]
        masks, mean, std = (torch.cat(p) for p in zip(*parts))
        rows = [{"index": i, "source": src} for i, src in enumerate(data.sources)]
        save = lambda out: segment(model, data, Path(out), ensemble, batch_size, seed, self.rt.device,  # noqa: E731
                                   self.rt.autocast)
        return Samples({"seg": masks, "seg_mean": mean, "seg_std": std}, rows, None, {}, save)

    def _conditions(self, job: Job, masks, n: int | None) -> None:
        """job's conditioning from masks= (a tensor, a dataset folder, or a seg model's Pipeline)."""
        if masks is None:
            raise UserError(f"a {self.mode} model needs masks= (a tensor, a NIfTI dataset folder, or a seg "
                            "model's Pipeline)")
        if isinstance(masks, Pipeline):
            if not masks.model.mode.makes_masks or self.needs != "mask":
                raise UserError(f"masks=: {masks.model.path} does not make masks for this model (a seg model "
                                "conditions mask-conditioned models)")
            theirs, ours = masks.model.mode.vocab, self.model.mode.vocab
            if theirs.record() != ours.record():
                raise UserError(f"masks=: {masks.model.path} makes masks of {theirs.describe()}; this model is "
                                f"conditioned on {ours.describe()} (data.labels)")
            if masks.shape != self.shape:
                raise UserError(f"masks=: the seg model makes {masks.shape} masks, this model expects {self.shape}")
            job.seg_model = masks.model
            return
        if isinstance(masks, (str, Path)):
            job.use_real_conditions(masks, *load_real_conditions(str(masks), self.model))
            job.num_images = n or len(job.real_sources)
            return
        cond = torch.as_tensor(masks).float()
        roles = self.model.mode.condition_roles
        if cond.dim() == len(self.shape) + 1 and len(roles) == 1:
            cond = cond.unsqueeze(1)
        if tuple(cond.shape[1:]) != (len(roles), *self.shape):
            raise UserError(f"masks= has shape {tuple(cond.shape)}; this model takes (N, {len(roles)}, "
                            f"{', '.join(map(str, self.shape))}) ({', '.join(roles)})")
        if not len(cond):
            raise UserError("masks= holds no masks (its first dimension is 0)")
        vocab = self.model.mode.vocab
        images = [k for k, r in enumerate(roles) if r != MASK_ROLE]
        if not torch.isfinite(cond).all() or (images and (cond[:, images].min() < 0 or cond[:, images].max() > 1)):
            raise UserError("masks= must hold finite values, images in [0, 1]")
        if MASK_ROLE in roles:
            k = roles.index(MASK_ROLE)
            if vocab.binary:
                if cond[:, k].min() < 0 or cond[:, k].max() > 1:
                    raise UserError("masks= must hold values in [0, 1] (binary masks {0, 1})")
                if not ((cond[:, k] == 0) | (cond[:, k] == 1)).all():
                    raise UserError("masks= holds values between 0 and 1 (soft masks); give binary masks {0, 1}, "
                                    "e.g. (masks > 0.5).float()")
            else:
                from medgen.common.labels import unknown_values
                bad = unknown_values(cond[:, k].numpy(), vocab)
                if bad:
                    raise UserError(f"masks= holds {bad[:5]}, not labels of {vocab.describe()}")
                if len(vocab.ids) > 1 and int(cond[:, k].max()) <= 1:
                    raise UserError(f"masks= holds only 0 and 1 (binary masks); the model was trained on label "
                                    f"maps of {vocab.describe()}")
        job.real_conditions, job.real_sources = cond, [f"array#{i}" for i in range(len(cond))]
        job.num_images = n or len(cond)

    def _labels(self, job: Job, labels, n: int | None) -> None:
        names = self.classes
        if labels is None:
            raise UserError(f"a class model needs labels= (one of {', '.join(names)} per sample, or None)")
        if isinstance(labels, dict):        # {class: count}, as --class_counts
            bad = [(k, v) for k, v in labels.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
            if bad or not sum(labels.values()):
                raise UserError(f"labels=: a dict gives each class its number of samples (whole numbers >= 0, not "
                                f"all 0), got {bad[0][0]!r}: {bad[0][1]!r}" if bad else
                                "labels=: a dict gives each class its number of samples; every count is 0")
            labels = [name for name, count in labels.items() for _ in range(count)]
        elif isinstance(labels, str):
            labels = [labels] * (n or 1)
        elif hasattr(labels, "__iter__"):
            labels = list(labels)
        else:
            raise UserError(f"labels=: give a class name, a list of names (one per sample) or a dict "
                            f"{{name: count}}, not {type(labels).__name__}")
        plan = []
        for lab in labels:
            if lab is None or lab == "none" or lab == UNCONDITIONAL:
                if self.model.cfg.mode.labels.cfg_dropout <= 0:
                    raise UserError("labels=None: the model was trained without label dropout, so it has no "
                                    "unconditional prediction")
                plan.append(len(names))
            elif lab in names:
                plan.append(names.index(lab))
            else:
                raise UserError(f"labels=: unknown class {lab!r} (the model knows: {', '.join(names)})")
        if n is not None and n != len(plan):
            raise UserError(f"n={n} differs from the {len(plan)} labels given")
        job.class_plan, job.num_images = plan, len(plan)
        job.class_counts = counts_text(plan, names)


def counts_text(plan: list[int], names: list[str]) -> str:
    """The --class_counts text that gives this plan ('melanoma=4,nevus=4'), so that saved settings match."""
    runs: list[list] = []
    for k in plan:
        name = names[k] if k < len(names) else "none"
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return ",".join(f"{name}={count}" for name, count in runs)


@validated(checked_inside=("config", "flags"))
def train(config=None, /, **flags) -> Path:
    """Train a model; returns its run folder. `config`: a Config, a preset name or YAML file (or a list of them),
    or a dict of sections ({'optim': {'epochs': 5}}) or dotted keys ({'optim.epochs': 5}). `flags`: train.py's
    flags by name (mode='bravo', strategy='rflow', epochs=40, data_dir=..., run_dir=...), applied last."""
    from medgen.Generation.TrainGen.core.cli import SWITCHES, TRAIN_FLAGS, _nested
    from medgen.Generation.TrainGen.core.config import Config, build_config, load_yaml, parse_set, to_dict
    from medgen.Generation.TrainGen.core.run import run_training
    layers = []
    for item in (config if isinstance(config, (list, tuple)) else [config] if config is not None else []):
        if isinstance(item, Config):
            layers.append(to_dict(item))
        elif isinstance(item, (str, Path)):
            layers.append(load_yaml(item))
        elif isinstance(item, dict):
            for key, value in item.items():
                layers.append(parse_set(f"{key}={json.dumps(value)}") if "." in key else {key: value})
        else:
            raise UserError(f"train(): config must be a Config, a YAML path or a dict, got {type(item).__name__}")
    for name, value in flags.items():
        if name in TRAIN_FLAGS:
            layers.append(_nested(TRAIN_FLAGS[name][0], value))
        elif name in SWITCHES and value:
            layers.append(_nested(*SWITCHES[name]))
        elif name not in SWITCHES:
            raise UserError(f"train(): unknown flag {name!r} (train.py's flags: {', '.join(TRAIN_FLAGS)}, "
                            f"{', '.join(SWITCHES)})")
    return run_training(build_config(*layers))


@validated(checked_inside=("options",), synthetic=Text(path=True), real=Text(optional=True, path=True),
           metrics=Text(), output=Text(optional=True, path=True))
def evaluate(synthetic, real=None, metrics: str = "all", output=None, **options) -> dict:
    """run_evaluation.py as a call: every metric record ({metric, value, n, ci95, method} or {available: False,
    reason}) in result['metrics']; written to `output` (metrics.json, report.md, plots) when given. options: the
    fields of eval/obj_eval/core/evaluate.py's Options (positive_only=True, image_type='t1_gd', ...)."""
    import dataclasses
    from medgen.eval.obj_eval.core.evaluate import Options, claim_output, evaluate as run, parse_metrics, write_outputs
    known = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"evaluate(): unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    opts = Options(str(synthetic), None if real is None else str(real), parse_metrics(metrics),
                   output=None if output is None else str(output), **options)
    out = claim_output(opts, Path(output)) if output is not None else None
    result = run(opts, out)
    if out is not None:
        write_outputs(result, out)
    result.pop("_sets", None)          # the loaded image tensors, not part of the record
    return result


@validated(checked_inside=("synthetic", "flags"), real=Text(path=True), output=Text(optional=True, path=True))
def utility(real, synthetic=None, output=None, **flags) -> dict:
    """run_utility.py as a call (flags by name: seeds=3, recipes='real,real+synthetic', preset='tiny', ...);
    returns utility.json as a dict (rows, verdict figures, audit sections)."""
    from medgen.eval.obj_eval.utility.cli import main
    out = Path(output) if output is not None else Path(synthetic or ".") / "utility"
    argv = ["--real_dir", str(real), "--output", str(out)]
    for d in ([synthetic] if isinstance(synthetic, (str, Path)) else synthetic or []):
        argv += ["--synthetic_dir", str(d)]
    for name, value in flags.items():
        if value is True:
            argv.append(f"--{name}")
        elif value not in (False, None):
            argv += [f"--{name}", ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    try:
        main(argv)
    except SystemExit as stop:       # argparse refused a flag (its line is on stderr)
        if stop.code:
            raise UserError(f"utility(): a flag was refused ({' '.join(argv)}); see the line above") from None
    return json.loads((out / "utility.json").read_text())
