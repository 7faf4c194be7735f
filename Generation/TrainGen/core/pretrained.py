"""Pretrained diffusion weights in the diffusers format (the google/ddpm-* family and other UNet2DModel
checkpoints as published on the model hubs), read from a local folder: nothing is downloaded.

A folder is either a model folder (config.json + diffusion_pytorch_model.safetensors or .bin) or a pipeline
folder (unet/ as above, and scheduler/scheduler_config.json). `train.py --init_from DIR`:
  * sets model.backend = diffusers and stores the UNet2DModel config in the run's config (model.unet2d), so
    the run's checkpoints load without the folder;
  * maps the scheduler config onto the DDPM strategy (number of train timesteps, beta schedule and range,
    prediction type); where the run's setting differs, a default is overridden (printed) and a value set to
    something else is an error; a scheduler the DDPM strategy cannot represent is an error;
  * adapts the channels: 3 pretrained image channels onto 1 (grey) sum the input filters, which is the
    pretrained network on the grey image repeated into RGB, and average the output filters; the input
    channels a mode adds for its conditions (a mask, another sequence) and a class embedding start at zero,
    so the network computes the pretrained function at step 0 whatever the conditions are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from medgen.common.errors import UserError
from medgen.common.fileio import safe_load
from medgen.Generation.TrainGen.core.config import MAX_CHANNELS

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MONAI_LINEAR = (1e-4, 2e-2)          # MONAI DDPMScheduler's linear_beta range, which the ddpm strategy uses
SCHEDULES = {"linear": "linear"}     # diffusers beta_schedule -> strategy.ddpm.schedule
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}


@dataclass
class DiffusersFolder:
    root: Path
    unet_dir: Path
    weights: Path
    config: dict
    scheduler: dict | None


def is_diffusers_folder(path) -> bool:
    """A diffusers model or pipeline folder (a medgen export has a config.json too, and is not one)."""
    from medgen.Generation.TrainGen.core.exported import is_export
    p = Path(path)
    return p.is_dir() and ((p / "config.json").is_file() or (p / "unet" / "config.json").is_file()) and not is_export(p)


def _json(path: Path, flag: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {path}: not a readable JSON file ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: expected a JSON object")
    return data


def read_folder(path, flag: str = "--init_from") -> DiffusersFolder:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: folder does not exist (put a diffusers UNet2DModel folder there: "
                        "config.json + diffusion_pytorch_model.safetensors, or a pipeline folder with unet/ and "
                        "scheduler/; nothing is downloaded)")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"{flag} {root}: no config.json (expected a diffusers model folder, or unet/config.json)")
    config = _json(unet_dir / "config.json", flag)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{flag} {unet_dir / 'config.json'}: describes a {config['_class_name']}, not a UNet2DModel")
    check_unet_config(config, unet_dir / "config.json", flag)
    weights = next((unet_dir / w for w in WEIGHT_FILES if (unet_dir / w).is_file()), None)
    if weights is None:
        raise UserError(f"{flag} {unet_dir}: no weights file ({' or '.join(WEIGHT_FILES)})")
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler = _json(sched_file, flag) if sched_file.is_file() else None
    return DiffusersFolder(root, unet_dir, weights, config, scheduler)


MAX_PARAMETERS = 4e9          # convolution weights a config may imply before nothing is allocated


def check_unet_config(config: dict, path: Path, flag: str) -> None:
    """A UNet2DModel config.json checked before diffusers builds it: known keys, types, group divisibility and
    a size bound, each one line naming the file (diffusers would raise a TypeError or allocate first)."""
    import inspect

    from diffusers import UNet2DModel
    known = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    args = unet_config(config)
    unknown = sorted(set(args) - known)
    if unknown:
        raise UserError(f"{flag} {path}: unknown UNet2DModel key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    ints = ("in_channels", "out_channels", "layers_per_block", "norm_num_groups", "sample_size",
            "attention_head_dim", "num_class_embeds")
    for key in ints:
        v = args.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            if key == "sample_size" and isinstance(v, list) and all(isinstance(n, int) and n > 0 for n in v):
                continue
            raise UserError(f"{flag} {path}: {key} must be a positive whole number, got {v!r}")
    blocks = args.get("block_out_channels", [224, 448, 672, 896])
    if not isinstance(blocks, list) or not blocks or not all(isinstance(c, int) and not isinstance(c, bool)
                                                             and 0 < c for c in blocks):
        raise UserError(f"{flag} {path}: block_out_channels must be a list of positive whole numbers, got {blocks!r}")
    if max(blocks) > MAX_CHANNELS:
        raise UserError(f"{flag} {path}: block_out_channels {blocks} has more than {MAX_CHANNELS} channels in a level")
    groups = args.get("norm_num_groups", 32)
    bad = [c for c in blocks if c % groups]
    if bad:
        raise UserError(f"{flag} {path}: norm_num_groups {groups} does not divide block_out_channels {bad} "
                        "(GroupNorm splits each level's channels into equal groups)")
    for key in ("down_block_types", "up_block_types"):
        if key in args and (not isinstance(args[key], list) or len(args[key]) != len(blocks)):
            raise UserError(f"{flag} {path}: {key} must list one block per level ({len(blocks)})")
    layers = args.get("layers_per_block", 2)
    params = sum(2 * (layers + 1) * 9 * c * c for c in blocks) * 2      # down and up resnets, 3x3 convolutions
    if params > MAX_PARAMETERS:
        raise UserError(f"{flag} {path}: this config implies about {params / 1e9:.0f} billion convolution weights "
                        f"({params * 4 / 2 ** 30:.0f} GiB in float32); refused before allocating it")


def read_weights(folder: DiffusersFolder, flag: str = "--init_from") -> dict[str, torch.Tensor]:
    if folder.weights.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            state = load_file(str(folder.weights))
        except Exception as err:  # noqa: BLE001 - any decoding failure of a user's file is one message
            raise UserError(f"{flag} {folder.weights}: unreadable weights ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:120] if str(err) else 'corrupt'})") from None
    else:
        state = safe_load(folder.weights, "weights file")   # pickles with code are refused, never run
    conv_in = state.get("conv_in.weight") if isinstance(state, dict) else None
    claimed = folder.config.get("in_channels")
    if conv_in is not None and conv_in.dim() == 4 and claimed is not None and conv_in.shape[1] != claimed:
        raise UserError(f"{flag} {folder.unet_dir / 'config.json'}: in_channels {claimed} contradicts the weights "
                        f"(conv_in takes {conv_in.shape[1]} channel(s) in {folder.weights.name})")
    return state


def unet_config(config: dict) -> dict:
    """The UNet2DModel constructor arguments of a config.json (diffusers' bookkeeping keys left out)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def scheduler_settings(sched: dict, flag: str = "--init_from") -> dict:
    """{num_timesteps, schedule, prediction} of a diffusers DDPM-family scheduler config."""
    beta = sched.get("beta_schedule", "linear")
    if beta not in SCHEDULES:
        raise UserError(f"{flag}: scheduler beta_schedule {beta!r} cannot be represented by the ddpm strategy "
                        f"(it supports {', '.join(SCHEDULES)} from {MONAI_LINEAR[0]} to {MONAI_LINEAR[1]})")
    lo, hi = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 2e-2))
    if abs(lo - MONAI_LINEAR[0]) > 1e-9 or abs(hi - MONAI_LINEAR[1]) > 1e-9 or sched.get("trained_betas"):
        raise UserError(f"{flag}: scheduler betas {lo:g}..{hi:g} cannot be represented by the ddpm strategy "
                        f"(its linear schedule runs from {MONAI_LINEAR[0]:g} to {MONAI_LINEAR[1]:g})")
    pred = sched.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise UserError(f"{flag}: scheduler prediction_type {pred!r} is not supported (epsilon or v_prediction)")
    return {"num_timesteps": int(sched.get("num_train_timesteps", 1000)), "schedule": SCHEDULES[beta],
            "prediction": PREDICTIONS[pred]}


def apply_to_config(cfg, folder: DiffusersFolder) -> tuple[object, list[str]]:
    """(the config with the pretrained architecture and schedule, notes). A schedule setting that differs from
    the scheduler's is an override when it is still the default, an error when it was set to something else."""
    from medgen.Generation.TrainGen.core.config import StrategyConfig
    notes = []
    if cfg.strategy.name != "ddpm":
        raise UserError(f"--init_from {folder.root}: diffusers UNet2DModel weights are DDPM weights; train them "
                        f"with --strategy ddpm (not {cfg.strategy.name})")
    st = cfg.strategy
    if folder.scheduler is not None:
        want = scheduler_settings(folder.scheduler)
        defaults = StrategyConfig()
        current = {"num_timesteps": st.num_timesteps, "schedule": st.ddpm.schedule, "prediction": st.ddpm.prediction}
        default = {"num_timesteps": defaults.num_timesteps, "schedule": defaults.ddpm.schedule,
                   "prediction": defaults.ddpm.prediction}
        keys = {"num_timesteps": "strategy.num_timesteps", "schedule": "strategy.ddpm.schedule",
                "prediction": "strategy.ddpm.prediction"}
        for k, v in want.items():
            if current[k] == v:
                continue
            if current[k] != default[k]:
                raise UserError(f"--init_from {folder.root}: its scheduler has {k} {v!r}, but {keys[k]} is set to "
                                f"{current[k]!r}; leave it out to use the pretrained one")
            notes.append(f"{keys[k]}: {current[k]!r} -> {v!r} (from {folder.root}/scheduler)")
        st = replace(st, num_timesteps=want["num_timesteps"],
                     ddpm=replace(st.ddpm, schedule=want["schedule"], prediction=want["prediction"]))
    else:
        notes.append(f"{folder.root}: no scheduler/scheduler_config.json; the run's DDPM settings are kept")
    model = replace(cfg.model, backend="diffusers", unet2d=unet_config(folder.config))
    notes.append(f"model.backend: diffusers UNet2DModel from {folder.unet_dir}")
    return replace(cfg, model=model, strategy=st), notes


def adapt_state(pretrained: dict[str, torch.Tensor], target: dict[str, torch.Tensor], image_channels: int,
                flag: str = "--init_from") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The pretrained state dict shaped like `target` (our UNet2DModel's): conv_in / conv_out adapted to the
    image and condition channels, a class embedding the pretrained model lacks zero-initialised."""
    out, notes = dict(pretrained), []
    have, want = pretrained["conv_in.weight"].shape[1], target["conv_in.weight"].shape[1]
    if have != image_channels:
        notes.append(f"conv_in: the {have} pretrained input channel(s) summed into {image_channels} image channel(s)")
    if want > image_channels:
        notes.append(f"conv_in: {want - image_channels} condition channel(s) added, zero-initialised")
    if pretrained["conv_out.weight"].shape[0] != target["conv_out.weight"].shape[0]:
        notes.append(f"conv_out: {pretrained['conv_out.weight'].shape[0]} output channel(s) averaged into "
                     f"{target['conv_out.weight'].shape[0]}")
    out["conv_in.weight"] = torch.zeros_like(target["conv_in.weight"])   # condition channels stay at zero
    out["conv_in.weight"][:, :image_channels] = _map_channels(pretrained["conv_in.weight"], 1, image_channels, "sum",
                                                              flag)
    out["conv_out.weight"] = _map_channels(pretrained["conv_out.weight"], 0, target["conv_out.weight"].shape[0], "mean", flag)
    out["conv_out.bias"] = _map_channels(pretrained["conv_out.bias"], 0, target["conv_out.bias"].shape[0], "mean", flag)
    for k, v in target.items():
        if k not in out and k.startswith("class_embedding."):
            out[k] = torch.zeros_like(v)
            notes.append(f"{k}: new, zero-initialised (the pretrained model has no class labels)")
    missing = sorted(set(target) - set(out))
    unexpected = sorted(set(out) - set(target))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{flag}: the weights do not fit the UNet2DModel config ({what})")
    bad = [k for k in target if out[k].shape != target[k].shape]
    if bad:
        raise UserError(f"{flag}: weight {bad[0]} has shape {tuple(out[bad[0]].shape)}, the model needs "
                        f"{tuple(target[bad[0]].shape)}")
    return out, notes


def _map_channels(w: torch.Tensor, dim: int, n: int, how: str, flag: str) -> torch.Tensor:
    have = w.shape[dim]
    if have == n:
        return w.clone()
    if n == 1:
        return w.sum(dim, keepdim=True) if how == "sum" else w.mean(dim, keepdim=True)
    raise UserError(f"{flag}: the pretrained model has {have} image channels; this data has {n} "
                    "(1 and 3 are mapped onto each other, other counts are not)")


def load_init_weights(net, mode, path, meta: dict) -> list[str]:
    """--init_from: weights (EMA when present) of another run, or a diffusers UNet2DModel folder (channels
    adapted, core/pretrained.py), loaded into net; returns one log line per adaptation. A class run's label
    embedding is mapped by class name onto this run's classes (a subset, or new classes, which start from the
    source's unconditional embedding); any other difference in architecture is refused."""
    from medgen.Generation.TrainGen.core.checkpoint import load_checkpoint, model_weights
    from medgen.Generation.TrainGen.core.exported import is_export, read_export
    notes = []
    try:
        if is_diffusers_folder(path):
            folder = read_folder(path)
            state, notes = adapt_state(read_weights(folder), net.unet.state_dict(), mode.out_channels)
            net.unet.load_state_dict(state)
        else:
            ckpt = read_export(Path(path), "--init_from") if is_export(path) else load_checkpoint(path)
            state = model_weights(ckpt)
            notes = map_class_embedding(state, net.state_dict(), ckpt.get("meta", {}).get("class_names") or [],
                                        meta.get("class_names") or [])
            net.load_state_dict(state)
    except RuntimeError as err:
        first = [ln.strip() for ln in str(err).splitlines() if ln.strip()][1:2]
        raise UserError(f"--init_from {path}: incompatible architecture ({first[0] if first else err})") from None
    return notes + [f"initialised weights from {path}"]


def map_class_embedding(state: dict, target: dict, source_classes: list[str], classes: list[str]) -> list[str]:
    """Rewrite state's label-embedding rows (in place) for this run's classes, by name: a class the source knew
    keeps its row, a new class starts from the source's null (unconditional) row, the null row stays last."""
    keys = [k for k in target if k.endswith("class_embedding.weight") and k in state]
    if not keys or not source_classes or source_classes == classes:
        return []
    for k in keys:
        src = state[k]
        null = src[len(source_classes)]
        state[k] = torch.stack([src[source_classes.index(c)] if c in source_classes else null for c in classes]
                               + [null])
    kept = [c for c in classes if c in source_classes]
    new = [c for c in classes if c not in source_classes]
    dropped = [c for c in source_classes if c not in classes]
    return [f"class embedding mapped by name: kept {', '.join(kept) or 'none'}"
            + (f"; new {', '.join(new)}, starting from the unconditional embedding" if new else "")
            + (f"; dropped {', '.join(dropped)}" if dropped else "")]
