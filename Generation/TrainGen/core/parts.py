"""What a run is built from: a strategy and a mode for a config, and the network, checked against the data.
Shared by training, the batch-size probe, the LR test and every loader of trained models (below all of them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from medgen.common.data import MASK_ROLE
from medgen.common.errors import UserError, grid_text, lookup
from medgen.common.labels import vocabulary
from medgen.Generation.TrainGen.core import latent
from medgen.Generation.TrainGen.core.control import ControlledMode, ControlledUNet, build_controlnet, copy_matching
from medgen.Generation.TrainGen.core.exported import read_model
from medgen.Generation.TrainGen.core.modes import MODES
from medgen.Generation.TrainGen.core.network import PRESETS, build_unet
from medgen.Generation.TrainGen.core.strategies import STRATEGIES


def compile_enabled(cfg, device) -> bool:
    return cfg.runtime.compile if cfg.runtime.compile is not None else device.type == "cuda"


def uses_channels_last(cfg, device) -> bool:
    """channels_last on CUDA with torch.compile only: compiled kernels fuse the layout, while eager GroupNorm
    (every UNet block has one) has no fast NHWC kernel and converts back and forth (runtime.channels_last)."""
    return device.type == "cuda" and cfg.runtime.channels_last and compile_enabled(cfg, device)


def training_model(net: torch.nn.Module, cfg, rt) -> torch.nn.Module:
    """The network as the training step calls it: wrapped in DDP when distributed, compiled when enabled."""
    dev = rt.device
    # gradient_as_bucket_view: gradients live in the all-reduce buckets (no second copy of every gradient);
    # static_graph: every step runs the same graph (fixed shapes, drop_last), so DDP can skip re-checking
    # which parameters were used and overlap the reduction of the last buckets better
    model = (DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True,
                 static_graph=True) if rt.distributed else net)
    if compile_enabled(cfg, dev):
        # mode "default": fused kernels without CUDA graphs; "reduce-overhead" (CUDA graphs) would pin a
        # second copy of activations and recapture on every validation shape; dynamic=False because every
        # training batch has the same shape (batch_indices drops the tail).
        model = torch.compile(model, backend=cfg.runtime.compile_backend, dynamic=False,
                              **({"mode": "default"} if cfg.runtime.compile_backend == "inductor" else {}))
    return model


def build_parts(cfg, num_classes: int | None, image_channels: int | None, device="cpu", data=None,
                latent_scale: float | None = None):
    """(strategy, mode) objects for a config; unknown names are user errors. With latent.autoencoder the mode
    works in that autoencoder's latent space (core/latent.py; its scale measured on `data` unless given)."""
    strategy = lookup(STRATEGIES, cfg.strategy.name, "--strategy")(cfg.strategy)
    mode = lookup(MODES, cfg.mode.name, "--mode")(cfg.mode, num_classes, image_channels)
    mode.vocab = vocabulary(cfg.data)       # how masks are coded: one channel, or one per label
    if mode.needs == "inpaint" and cfg.latent.autoencoder:
        raise UserError("--mode inpaint works in pixel space (the known pixels are kept exactly); leave --latent out")
    mode = latent.wrap(mode, cfg, device, data, latent_scale)
    if cfg.runtime.control_from:            # a frozen image run with mask control (core/control.py)
        if mode.needs is not None:
            raise UserError(f"--control_from: the frozen run generates mode {cfg.mode.name!r}, conditioned on "
                            f"{mode.needs}; a ControlNet adds mask control to an unconditional run (--mode image)")
        mode = ControlledMode(mode)
    if latent.in_latent(mode) is not None:
        strategy.clip_sample = False      # unit-variance latents are not bounded to [-1, 1] (run.preflight)
    strategy.bind_shape(latent.sample_shape(cfg, mode))
    return strategy, mode


def build_network(cfg, mode) -> torch.nn.Module:
    """The denoising network of a run: the preset's UNet, or for a ControlNet run the frozen UNet with its
    ControlNet (weights as built: the caller loads them)."""
    controlled = isinstance(mode, ControlledMode)
    in_channels = mode.mode.in_channels if controlled else mode.in_channels   # a ControlNet reads the mask
    net = build_unet(cfg.model, in_channels, mode.out_channels, mode.class_embeds, spatial_dims=cfg.data.spatial_dims)
    if not controlled:
        return net
    control = build_controlnet(cfg.model, net, in_channels, mode.vocab.channels, cfg.data.spatial_dims,
                               mode.class_embeds)
    return ControlledUNet(net, control, mode.out_channels, cfg.runtime.control_scale)


def check_grid(cfg, shape: tuple[int, ...]) -> None:
    """Every UNet level halves the grid: each side must divide by 2^(levels - 1), else skip connections misalign."""
    levels = len(cfg.model.channels or PRESETS[cfg.model.preset][0])
    factor = 2 ** (levels - 1)
    if cfg.model.backend == "monai" and any(n % factor for n in shape):
        where = "latent grid" if cfg.latent.autoencoder else "data shape"
        raise UserError(f"the {where} {grid_text(shape)} does not divide by {factor}, which the "
                        f"{levels}-level UNet needs (data.image_size / data.volume_shape)")


@dataclass
class RunParts:
    """What a run is built from, built once and handed to the batch-size probe, the LR test and the trainer."""
    strategy: object
    mode: object
    net: torch.nn.Module
    meta: dict


def build_run_parts(cfg, train_data, device) -> RunParts:
    channels = train_data.images.shape[1] if train_data.images is not None else None
    meta = {"num_classes": len(train_data.class_names) or None, "image_channels": channels,
            "class_names": list(train_data.class_names), "labels": vocabulary(cfg.data).record()}
    if cfg.data.mask_mode == "classes" and cfg.data.labels == "binary" and train_data.masks is not None:
        raise UserError("data.mask_mode=classes keeps the masks' label ids, which a binary model would read as "
                        "one tumour: set data.labels (brats2021, brats2023 or custom) to train on label maps")
    if train_data.spacing is not None:   # the voxel grid generated volumes are written on
        meta["spacing"] = train_data.spacing.float().median(0).values.tolist()
    if cfg.optim.perceptual_weight > 0 and (cfg.data.spatial_dims != 2 or cfg.latent.autoencoder):
        raise UserError("optim.perceptual_weight (a 2D RadImageNet loss on the predicted image) needs 2D "
                        "pixel-space training; set it to 0 for volumes or latent runs")
    frozen = read_model(cfg.runtime.control_from, "--control_from") if cfg.runtime.control_from else None
    strategy, mode = build_parts(cfg, meta["num_classes"], channels, device, train_data,
                                 latent_scale=frozen[1]["meta"].get("latent_scale") if frozen else None)
    inner = latent.in_latent(mode)
    if cfg.optim.region_contrast_weight > 0 and (MASK_ROLE not in mode.condition_roles or inner is not None):
        raise UserError(f"optim.region_contrast_weight: mode {mode.name} is not conditioned on a mask in pixel space "
                        "(the region contrast relabels a region of the conditioning mask)")
    if inner is not None:
        meta.update(latent_scale=inner.scale, autoencoder_sha256=inner.ae.sha256)
    strategy.check_sampler(cfg.strategy.sampler)  # a wrong sampler fails now, not at the first validation
    check_grid(cfg, latent.sample_shape(cfg, mode))
    net = build_network(cfg, mode).to(device)
    if frozen is not None:
        meta["control"] = load_frozen(net, frozen)
    return RunParts(strategy, mode, net, meta)


def load_frozen(net: ControlledUNet, frozen: tuple) -> dict:
    """The frozen run's sampling weights into net.base, and the ControlNet's encoder copied from them again
    (it was built from random base weights); returns what the checkpoint records of the frozen run."""
    from medgen.common.features import sha256_of
    from medgen.Generation.TrainGen.core.checkpoint import model_weights
    file, state = frozen
    try:
        net.base.load_state_dict(model_weights(state))
    except RuntimeError as err:
        raise UserError(f"--control_from {file}: its weights do not fit this run's network "
                        f"({str(err).splitlines()[0][:160]})") from None
    copy_matching(net.control, net.base.state_dict())
    return {"frozen_run": str(file.resolve()), "frozen_sha256": sha256_of(file), "scale": net.scale,
            "frozen_classes": state["meta"].get("class_names")}


