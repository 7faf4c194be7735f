"""Latent diffusion (Rombach et al. 2022; MONAI's generative tutorials; MAISI for volumes).

Stage 1, `train.py --stage autoencoder`: a MONAI AutoencoderKL learns to compress the mode's generated channels
(bravo: one sequence; dual: both) with L1 + KL + perceptual + PatchGAN losses. Stage 2, `train.py --latent AE_RUN`:
the chosen strategy diffuses in that autoencoder's latent space. `LatentMode` wraps the mode, so the trainer,
the samplers and generate.py are unchanged:
  * the target x0 is the encoder's mean (not a draw from the posterior: the latents of an image are then fixed,
    which keeps training reproducible and resumes exact), times a scale that gives the training latents unit
    variance; the scale is measured once on the training split and stored in the run;
  * conditioning masks are area-downsampled to the latent grid, not encoded: the autoencoder is trained on
    images and has no code for masks, and a downsampled mask keeps the tumour's position and partial-volume
    extent exactly;
  * outputs decode z / scale back to [-1, 1] before the mode turns them into named images.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL

from medgen.common.errors import UserError, grid_text
from medgen.common.features import sha256_of
from medgen.common.fileio import safe_load

SCALE_SAMPLES = 64   # training samples whose latents set the scale


def build_autoencoder(latent_cfg, spatial_dims: int, channels: int) -> AutoencoderKL:
    levels = list(latent_cfg.channels)
    return AutoencoderKL(
        spatial_dims=spatial_dims, in_channels=channels, out_channels=channels, channels=levels,
        latent_channels=latent_cfg.latent_channels, num_res_blocks=latent_cfg.num_res_blocks,
        attention_levels=[False] * len(levels), norm_num_groups=min(32, min(levels)),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def downsample_factor(latent_cfg) -> int:
    return 2 ** (len(latent_cfg.channels) - 1)


def latent_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    if any(n % factor for n in shape):
        raise UserError(f"data shape {grid_text(shape)} is not divisible by the autoencoder's downsampling "
                        f"factor {factor}; choose sizes that are multiples of {factor}")
    return tuple(n // factor for n in shape)


class Autoencoder:
    """A trained autoencoder run, frozen: what a latent diffusion run needs of it."""

    def __init__(self, path, state: dict, sha256: str | None = None):
        from medgen.Generation.TrainGen.core.config import stored_config
        self.path, self.meta = path, state["meta"]
        self.cfg = stored_config(state["config"])
        self.net = build_autoencoder(self.cfg.latent, self.meta["spatial_dims"], self.meta["channels"])
        self.net.load_state_dict(state["autoencoder"])
        self.net.eval().requires_grad_(False)
        self.factor = downsample_factor(self.cfg.latent)
        self.sha256 = sha256 or sha256_of(path)   # an exported autoencoder keeps its checkpoint's digest

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent.latent_channels

    def to(self, device) -> "Autoencoder":
        self.net.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encode(x.float())[0]          # the posterior mean

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z.float())


def load_autoencoder(path, flag: str = "--latent") -> Autoencoder:
    """An autoencoder run folder (its latest checkpoint) or checkpoint file; anything else is one clear error."""
    from medgen.Generation.TrainGen.core.checkpoint import checkpoint_file
    from medgen.Generation.TrainGen.core.exported import read_autoencoder_export
    exported = read_autoencoder_export(Path(path), flag)
    if exported is not None:
        file, state, digest = exported
        return Autoencoder(file, state, digest)
    try:
        file = checkpoint_file(path)
    except UserError as err:
        raise UserError(f"{flag}: {err}") from None
    state = safe_load(file, "autoencoder checkpoint")
    if not isinstance(state, dict) or state.get("meta", {}).get("stage") != "autoencoder":
        raise UserError(f"{flag} {file}: not an autoencoder run (train one with train.py --stage autoencoder)")
    try:
        return Autoencoder(file, state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"{flag} {file}: damaged autoencoder checkpoint ({str(err).splitlines()[0]})") from None


def check_fits(ae: Autoencoder, mode, spatial_dims: int) -> None:
    """The autoencoder must code exactly what the mode generates (the same roles, so a bravo autoencoder never
    codes seg masks), in the same number of dimensions."""
    if ae.meta["spatial_dims"] != spatial_dims:
        raise UserError(f"--latent {ae.path}: the autoencoder is {ae.meta['spatial_dims']}D, the data are "
                        f"{spatial_dims}D (data.spatial_dims / --spatial_dims)")
    roles = list(ae.meta.get("roles") or [])
    if roles and roles != list(mode.generated_roles):
        raise UserError(f"--latent {ae.path}: the autoencoder codes {', '.join(roles)} (trained for mode "
                        f"{ae.meta.get('mode')}); mode {mode.name} generates {', '.join(mode.generated_roles)}: "
                        f"train an autoencoder for this mode (train.py --stage autoencoder --mode {mode.name})")
    if ae.meta["channels"] != mode.out_channels:
        raise UserError(f"--latent {ae.path}: the autoencoder codes {ae.meta['channels']} channel(s) "
                        f"({', '.join(ae.meta['roles'])}); mode {mode.name} generates {mode.out_channels} "
                        f"({', '.join(mode.generated_roles)})")


class LatentMode:
    """A mode whose generated channels live in an autoencoder's latent space (see the module docstring)."""

    def __init__(self, mode, ae: Autoencoder, scale: float):
        self.mode, self.ae, self.scale = mode, ae, float(scale)

    def __getattr__(self, name):            # everything else is the wrapped mode's
        return getattr(self.mode, name)

    @property
    def out_channels(self) -> int:
        return self.ae.latent_channels

    @property
    def in_channels(self) -> int:
        return self.mode.in_channels - self.mode.out_channels + self.ae.latent_channels

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.ae.encode(x0) * self.scale

    def split(self, batch: dict, train: bool = False, generator=None):
        x0, cond = self.mode.split(batch, train=train, generator=generator)
        return self.encode(x0), cond

    def forward(self, model, x_t, t, cond, guidance: float = 1.0):
        if "concat" in cond and cond["concat"].shape[2:] != x_t.shape[2:]:
            cond = {**cond, "concat": F.interpolate(cond["concat"].float(), size=x_t.shape[2:], mode="area")}
        return self.mode.forward(model, x_t, t, cond, guidance)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(z / self.scale).clamp(-1, 1)

    def outputs(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.mode.outputs(self.decode(z))



@torch.no_grad()
def latent_scale(ae: Autoencoder, mode, data, device) -> float:
    """1 / std of the latents of SCALE_SAMPLES training samples drawn with a fixed seed (Rombach et al.'s scale
    factor; not the first ones, which in a sorted folder may all be one class or one subject)."""
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:SCALE_SAMPLES]
    zs = [ae.encode(mode.split({k: v.to(device) for k, v in data.batch(chunk).items()})[0])
          for chunk in index.split(16)]
    std = float(torch.cat(zs).float().std())
    if not std > 0:
        raise UserError(f"--latent {ae.path}: the training latents have no variance (std {std}); the autoencoder "
                        "did not learn (train it longer)")
    return 1.0 / std


def in_latent(mode) -> "LatentMode | None":
    """The LatentMode a mode is, or wraps (a ControlNet run's mode wraps its frozen run's), else None."""
    while mode is not None:
        if isinstance(mode, LatentMode):
            return mode
        mode = vars(mode).get("mode")        # wrappers keep the wrapped mode as .mode
    return None


def check_unchanged(mode, meta: dict, what: str) -> None:
    """A latent run decodes with the autoencoder it was trained on: a file that changed since is refused."""
    mode = in_latent(mode)
    if mode is not None and meta.get("autoencoder_sha256") not in (None, mode.ae.sha256):
        raise UserError(f"{what}: its autoencoder {mode.ae.path} changed since the run was trained (SHA-256 "
                        f"{mode.ae.sha256[:12]}, the run recorded {meta['autoencoder_sha256'][:12]}); "
                        "use the original autoencoder checkpoint")


def sample_shape(cfg, mode) -> tuple[int, ...]:
    """The spatial shape the network works on: the data's, or its latent grid."""
    found = in_latent(mode)
    return latent_shape(cfg.data.shape, found.ae.factor) if found is not None else cfg.data.shape


def wrap(mode, cfg, device, data=None, scale: float | None = None):
    """The mode itself in pixel space; with latent.autoencoder a LatentMode (scale measured on `data` unless
    given, as a stored run gives it)."""
    if not cfg.latent.autoencoder:
        return mode
    ae = load_autoencoder(cfg.latent.autoencoder).to(device)
    check_fits(ae, mode, cfg.data.spatial_dims)
    latent_shape(cfg.data.shape, ae.factor)
    return LatentMode(mode, ae, scale if scale is not None else latent_scale(ae, mode, data, device))
