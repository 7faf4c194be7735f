"""Typed configuration tree: defaults here, presets in config/*.yaml, overrides from the CLI.

Precedence (later wins): dataclass defaults < --config FILE (one or more) < --set a.b=v < explicit flags.
Unknown keys and wrong types raise UserError naming the key, so a typo never silently does nothing.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medgen.common.data import DataConfig
from medgen.common.args import BIG
from medgen.common.errors import UserError, require as _check
from medgen.common.fileio import atomic_write_text


MAX_TIMESTEPS = 100_000      # published schedules use 1000; far more is a typo that would allocate first
MAX_BATCH = 65_536           # images per batch (and micro-batches per step); far more is a typo
MAX_SEED = 2**63 - 1         # common/args.py SEED: the same range as every other --seed
MAX_CHANNELS = 8192          # per UNet level; the widest published diffusion UNets use 1280-2048


@dataclass
class ModelConfig:
    preset: Literal["tiny", "small", "base128", "base256"] = "base128"  # see core/network.py
    channels: list[int] | None = None    # override the preset's channels per level
    attention_levels: list[bool] | None = None  # override the preset's attention per level
    num_res_blocks: int | None = None    # override the preset's residual blocks per level
    backend: Literal["monai", "diffusers"] = "monai"  # MONAI DiffusionModelUNet, or diffusers' UNet2DModel
    gradient_checkpointing: bool = False  # recompute each UNet block in the backward pass: less memory (3D), ~30%
                                         # slower
    unet2d: dict[str, Any] | None = None  # backend diffusers: UNet2DModel config (set by --init_from a diffusers
                                         # folder; None: built from the preset's channels and attention levels)

    def __post_init__(self):
        _check(self.channels is None or all(0 < c <= MAX_CHANNELS for c in self.channels),
               f"model.channels must be positive and at most {MAX_CHANNELS} per level, got {self.channels}")
        _check(self.num_res_blocks is None or 1 <= self.num_res_blocks <= 64,
               f"model.num_res_blocks must be in [1, 64], got {self.num_res_blocks}")


@dataclass
class DDPMOptions:                       # strategy.ddpm: read by the ddpm strategy (and its subclasses)
    schedule: Literal["linear", "cosine"] = "linear"  # beta schedule (MONAI DDPMScheduler)
    prediction: Literal["epsilon", "v"] = "epsilon"   # network target
    clip_sample: bool | None = None      # samplers clip the predicted x0 to [-1, 1] (MONAI's clip_sample); None: on in
                                         # pixel space, off in latent space (latents have unit variance, and true
                                         # is refused there)


@dataclass
class RFlowOptions:                      # strategy.rflow: read by the rflow strategy (velocity target always)
    time_sampling: Literal["uniform", "logit-normal"] = "uniform"  # training-time distribution (SD3: logit-normal)
    shift: float = 1.0                   # timestep shift t' = s t / (1 + (s - 1) t) (SD3; > 1: more time at high
                                         # noise), applied identically to training times and the sampling grid
    shift_base: int | None = None        # resolution-dependent shift (MONAI RFlowScheduler's rule): shift times
                                         # (pixels or voxels / shift_base^dims)^(1/dims); e.g. 64: 2 at 128 px

    def __post_init__(self):
        _check(self.shift > 0, "strategy.rflow.shift must be positive")
        _check(self.shift_base is None or self.shift_base >= 1, "strategy.rflow.shift_base must be >= 1 (or null)")


@dataclass
class StrategyConfig:
    name: str = "ddpm"                   # key of STRATEGIES (ddpm, rflow, or a registered one)
    num_timesteps: int = 1000            # training time discretisation
    sampler: str | None = None           # None: the strategy's default (ddpm -> ddpm, rflow -> euler); ddpm also
                                         # takes ddim and dpmpp_2m, rflow heun
    sample_steps: int | None = None      # None: num_timesteps for ancestral DDPM, 50 for DDIM, 20 for DPM-Solver++,
                                         # 30 for Euler, 15 for Heun
    ddpm: DDPMOptions = field(default_factory=DDPMOptions)
    rflow: RFlowOptions = field(default_factory=RFlowOptions)

    def __post_init__(self):
        _check(self.sample_steps is None or 1 <= self.sample_steps <= MAX_TIMESTEPS,
               f"strategy.sample_steps must be in [1, {MAX_TIMESTEPS}] (or null), got {self.sample_steps}")
        _check(2 <= self.num_timesteps <= MAX_TIMESTEPS, f"strategy.num_timesteps must be in [2, {MAX_TIMESTEPS}], "
               f"got {self.num_timesteps} (its schedule tensors alone would hold {self.num_timesteps * 8 * 4 / 2 ** 30:.3g}"
               " GiB; published schedules use 1000)")


@dataclass
class LabelOptions:                      # mode.labels: modes conditioned on a class label (class)
    cfg_dropout: float = 0.1             # label dropout for classifier-free guidance (Ho & Salimans 2022)
    guidance_scale: float = 1.0          # sampling guidance (1 = plain conditional)


@dataclass
class SegmentOptions:                    # mode.segment: the mask-given-image mode (segment)
    image_key: str = "bravo"             # the conditioning NIfTI modality
    ensemble: int = 1                    # samples averaged per prediction (validation, --images_from)


@dataclass
class InpaintOptions:                    # mode.inpaint: the lesion-inpainting mode (inpaint)
    margin: int = 2                      # px (voxels) the region to regenerate extends beyond the lesion: its seam
    random_regions: float = 0.5          # training: share of samples whose region is a random lesion-shaped blob
                                         # (else the real tumour, dilated), so the model fills healthy tissue too
    replace: Literal["every", "end"] = "every"  # sampling: the known pixels replace the sample's at every step
                                         # (RePaint), or only in the final composition
    jumps: int = 1                       # RePaint resampling: each step is redone this many times (1: none)

    def __post_init__(self):
        _check(self.margin >= 0 and 0 <= self.random_regions <= 1 and self.jumps >= 1,
               "mode.inpaint: margin >= 0, random_regions in [0, 1] and jumps >= 1")


@dataclass
class ModeConfig:
    name: str = "seg"                    # key of MODES (seg, bravo, dual, class, segment, or a registered one);
                                         # seg, as the original research code's default
    sequence: str = "bravo"              # the MRI sequence the single-sequence modes image and inpaint generate
    labels: LabelOptions = field(default_factory=LabelOptions)
    segment: SegmentOptions = field(default_factory=SegmentOptions)
    inpaint: InpaintOptions = field(default_factory=InpaintOptions)


@dataclass
class OptimConfig:
    epochs: int = 500
    batch_size: int = 16
    auto_batch_size: bool = False        # CUDA: probe the largest batch that fits (--batch_size auto), 90% of it
    lr: float = 1e-4
    weight_decay: float = 0.0            # AdamW; diffusion UNets are usually trained without decay
    warmup_epochs: int = 5               # linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0               # max global grad norm
    grad_accum: int = 1                  # micro-batches per optimizer step
    min_snr: bool | None = None          # Min-SNR-gamma weighting (Hang et al. 2023); None: the strategy's default
                                         # (on for ddpm, off for rflow: Strategy.min_snr_default says why)
    min_snr_gamma: float = 5.0
    perceptual_weight: float = 0.0       # RadImageNet ResNet-50 feature loss on the predicted x0 (0: off)
    perceptual_weights: str | None = None  # local weights file (default $MEDGEN_WEIGHTS/radimagenet_resnet50.pt)
    perceptual_sha256: str | None = None   # expected SHA-256 of that file (checked when given)
    region_contrast_weight: float = 0.0  # mask-conditioned modes: region contrast after MAISI-v2's idea: one
                                         # label region per sample relabelled as background must change the
                                         # prediction inside it and nowhere else (0: off; costs a second forward)
    region_contrast_margin: float = 0.5  # the mean |prediction difference| asked for inside the region
    max_steps: int | None = None         # stop after this many optimizer steps (None: run all epochs)
    find_lr: bool = False                # run the LR range test first
    find_lr_then_train: bool = True      # after the LR test, train with the suggested LR (false: stop)
    find_lr_steps: int = 100             # steps of the LR sweep (1e-6 to 1, exponential); it stops early on divergence

    def __post_init__(self):
        _check(1 <= self.epochs <= BIG and 1 <= self.batch_size <= MAX_BATCH and 1 <= self.grad_accum <= MAX_BATCH,
               f"optim.epochs (--epochs) must be in [1, {BIG}], optim.batch_size (--batch_size) and optim.grad_accum "
               f"in [1, {MAX_BATCH}]")
        _check(math.isfinite(self.lr) and 0 < self.lr <= 10,
               f"optim.lr (--lr) must be a finite number in (0, 10], got {self.lr}")
        _check(self.max_steps is None or 1 <= self.max_steps <= BIG,
               f"optim.max_steps (--max_steps) must be in [1, {BIG}]")
        _check(0 <= self.warmup_epochs <= BIG, f"optim.warmup_epochs (--warmup_epochs) must be in [0, {BIG}]")
        _check(self.find_lr_steps >= 2, "optim.find_lr_steps must be at least 2")
        _check(self.region_contrast_weight >= 0 and self.region_contrast_margin > 0,
               "optim.region_contrast_weight must be >= 0 and optim.region_contrast_margin > 0")


@dataclass
class EMAConfig:
    enabled: bool = True
    beta: float = 0.9999
    update_after_step: int = 100         # plain copy before this, so early samples are not stuck at init
    update_every: int = 10


@dataclass
class RuntimeConfig:
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU (no fp16: NaNs)
    compile: bool | None = None          # torch.compile the UNet; None: on for CUDA, off on CPU (docs/gpu.md)
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"  # aot_eager: dynamo + AOT autograd without
                                         # code generation: the CPU check for graph breaks and recompiles
    channels_last: bool = True           # CUDA with torch.compile only (eager GroupNorm is slow in NHWC)
    multi_gpu: bool = False              # DDP (torchrun / srun)
    val_interval: int = 30               # epochs between validation + sample grids (the original default)
    num_val_samples: int = 16            # images in the sample grid
    log_interval: int = 20               # steps between scalar logs (loss read back from the device only then)
    keep_last: int = 3                   # checkpoints kept besides the best
    checkpoint_every: int = 1            # epochs between checkpoints (each is atomic; a kill loses < 1 epoch)
    resume: str | None = None            # auto | PATH
    init_from: str | None = None         # weights of another run to fine-tune from
    control_from: str | None = None      # a frozen image run to train a ControlNet for (mask control, core/control.py)
    control_scale: float = 1.0           # the ControlNet's residuals are multiplied by this (sampling may change it)
    max_nonfinite: int = 5               # stop after this many consecutive non-finite steps
    early_stop_patience: int | None = None  # segment mode: validations without Dice improvement
    stage: Literal["diffusion", "autoencoder"] = "diffusion"  # autoencoder: train latent diffusion's first stage

    def __post_init__(self):
        _check(0 <= self.seed <= MAX_SEED, f"runtime.seed (--seed) must be in [0, {MAX_SEED}], got {self.seed}")
        _check(1 <= self.val_interval <= BIG and 1 <= self.log_interval <= BIG and 1 <= self.checkpoint_every <= BIG,
               f"runtime.val_interval (--val_interval), runtime.log_interval and runtime.checkpoint_every must be "
               f"in [1, {BIG}]")
        _check(0 <= self.keep_last <= 1000 and 1 <= self.num_val_samples <= 1024 and self.max_nonfinite >= 1,
               "runtime.keep_last must be in [0, 1000], runtime.num_val_samples in [1, 1024] and "
               "runtime.max_nonfinite at least 1")


@dataclass
class LatentConfig:
    """Latent diffusion: the autoencoder stage (train.py --stage autoencoder) and the diffusion run on its latents
    (--latent AE_RUN). Defaults follow MONAI's generative tutorials (L1 + KL 1e-6 + perceptual + adversarial)."""
    autoencoder: str | None = None       # --latent: an autoencoder run folder or checkpoint; None: pixel space
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # AutoencoderKL levels: each after the
                                         # first halves the grid (3 levels: 4x smaller per axis)
    latent_channels: int = 3
    num_res_blocks: int = 1
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.001     # RadImageNet features (2D); skipped, said once, when no weights are found
    adv_weight: float = 0.01             # PatchGAN least-squares adversarial loss
    adv_start: int = 0                   # optimizer steps before the discriminator joins (0: from the start)

    def __post_init__(self):
        _check(len(self.channels) >= 1 and self.latent_channels >= 1, "latent.channels and latent.latent_channels "
               "must be non-empty and positive")


@dataclass
class PathsConfig:
    compute: Literal["local", "cluster"] = "local"
    run_dir: str | None = None           # None: <output root>/<run_name>
    run_name: str = "{mode}_{strategy}_{image_size}_{timestamp}"  # fields: mode, strategy, image_size, epochs,
                                         # timestamp; e.g. the original 'Diffusion_{mode}_{image_size}_{timestamp}'

    def __post_init__(self):
        try:
            self.run_name.format(mode="m", strategy="s", image_size=1, epochs=1, timestamp="t")
        except (KeyError, IndexError, ValueError) as err:
            raise UserError(f"paths.run_name {self.run_name!r}: unknown or malformed field {err} (known: mode, "
                            "strategy, image_size, epochs, timestamp)") from None
        _check("{timestamp}" in self.run_name, "paths.run_name must contain {timestamp} (runs must not collide)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value as type tp, or raise UserError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0])
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown config key '{prefix}{unknown[0]}' (known in {prefix[:-1] or 'the top level'}: "
                        f"{', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{prefix}{name} must be a mapping of keys, got {value!r}")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(item: str) -> dict:
    """'a.b=3' -> {'a': {'b': 3}}; the value is parsed as a YAML scalar (3, 0.1, true, [1, 2], null)."""
    if "=" not in item:
        raise UserError(f"--set expects section.key=value, got {item!r}")
    path, raw = item.split("=", 1)
    if path.strip() in {f.name for f in dataclasses.fields(Config)}:
        raise UserError(f"--set {item}: {path.strip()} is a section; set its keys one by one "
                        f"(--set {path.strip()}.KEY=VALUE)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    keys = path.strip().split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return out


PRESETS_DIR = Path(__file__).resolve().parents[3] / "config"   # the shipped presets (config/*.yaml)


def load_yaml(path: str | Path) -> dict:
    """A YAML file of config sections; a bare name (`tiny`, `bravo_128.yaml`) that is no file here is a shipped
    preset, so an installed medgen finds its presets from any folder."""
    path = Path(path)
    if not path.is_file() and path.parent == Path(".") and (PRESETS_DIR / f"{path.stem}.yaml").is_file():
        path = PRESETS_DIR / f"{path.stem}.yaml"
    if not path.is_file():
        raise UserError(f"config file not found: {path} (shipped presets: "
                        f"{', '.join(sorted(p.stem for p in PRESETS_DIR.glob('*.yaml')))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    return data


# keys that moved into their component's own section: old YAML files, --set and checkpoints keep working
MOVED = {"strategy.schedule": "strategy.ddpm.schedule", "strategy.prediction": "strategy.ddpm.prediction",
         "strategy.time_sampling": "strategy.rflow.time_sampling", "mode.cfg_dropout": "mode.labels.cfg_dropout",
         "mode.guidance_scale": "mode.labels.guidance_scale", "mode.image_key": "mode.segment.image_key",
         "mode.ensemble": "mode.segment.ensemble"}
_said: set[str] = set()


def migrate(values: dict, note: bool = True) -> dict:
    """Move deprecated keys to their new place (an explicit new key wins), saying so once per key (note=False:
    silently, for configs stored in older checkpoints, which the user has nothing to change in)."""
    import sys
    out = merge({}, values)
    for old, new in MOVED.items():
        (sec, key), (_, sub, leaf) = old.split("."), new.split(".")
        if isinstance(out.get(sec), dict) and key in out[sec]:
            value = out[sec].pop(key)
            target = out[sec].setdefault(sub, {})
            if isinstance(target, dict):   # anything else is reported by _build as a wrong type
                target.setdefault(leaf, value)
            if note and old not in _said:
                _said.add(old)
                print(f"note: config key {old} is now {new} (the old key still works)", file=sys.stderr)
    return out


def build_config(*layers: dict, note_moved: bool = True) -> Config:
    values: dict = {}
    for layer in layers:
        values = merge(values, migrate(layer, note_moved))
    return _build(Config, values, "")


def stored_config(values: dict) -> Config:
    """The config a checkpoint was saved with, read with today's keys (older checkpoints use moved ones)."""
    return build_config(values, note_moved=False)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + replace)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
