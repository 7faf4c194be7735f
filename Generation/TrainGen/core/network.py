"""The denoising networks: MONAI DiffusionModelUNet presets, always with SDPA attention (use_flash_attention=True:
without it the attention matrix is materialised and 128-256 px runs out of memory, MONAI #7944), or diffusers'
UNet2DModel (model.backend: diffusers) to start from published diffusers weights (core/pretrained.py).
Volumes (data.spatial_dims 3) use the same presets with spatial_dims=3 and, unless model.attention_levels says
otherwise, attention at the coarsest level only: a 3D attention map at a finer level is quadratic in far more
voxels."""
from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet

from medgen.common.errors import UserError

# name -> channels, attention_levels, num_res_blocks, norm_num_groups, num_head_channels
PRESETS = {
    "tiny": ((16, 32, 32), (False, False, True), 1, 8, 16),          # 0.28M params: tests, demo, CPU
    "small": ((32, 64, 64), (False, True, True), 1, 16, 32),         # 1.2M params
    "base128": ((128, 256, 256), (False, True, True), 1, 32, 256),   # 18.5M: MONAI 2D DDPM tutorial size
    "base256": ((128, 256, 256, 512), (False, False, True, True), 2, 32, 64),  # 74M
}


def unet_shape(model_cfg, spatial_dims: int = 2) -> dict:
    """The MONAI UNet's shape arguments for a model config: channels, attention levels, residual blocks, groups
    and head channels (a ControlNet copies them, core/control.py)."""
    channels, attention, res_blocks, groups, heads = PRESETS[model_cfg.preset]
    channels = tuple(model_cfg.channels or channels)
    if model_cfg.attention_levels is not None:
        attention = tuple(model_cfg.attention_levels)
    elif spatial_dims == 3:
        attention = tuple(i == len(channels) - 1 for i in range(len(channels)))
    if len(attention) != len(channels):
        raise UserError("model.attention_levels needs one entry per model.channels level")
    return {"channels": channels, "attention_levels": attention,
            "num_res_blocks": model_cfg.num_res_blocks or res_blocks, "norm_num_groups": min(groups, min(channels)),
            "num_head_channels": min(heads, min(channels))}


def build_unet(model_cfg, in_channels: int, out_channels: int, num_class_embeds: int | None = None,
               flash_attention: bool = True, spatial_dims: int = 2):
    """The preset's UNet; flash_attention=False (attention matrix materialised) only for the benchmark baseline."""
    shape = unet_shape(model_cfg, spatial_dims)
    channels, attention, res_blocks = shape["channels"], shape["attention_levels"], shape["num_res_blocks"]
    groups, heads = shape["norm_num_groups"], shape["num_head_channels"]
    if getattr(model_cfg, "backend", "monai") == "diffusers":
        if spatial_dims != 2:
            raise UserError("model.backend diffusers (UNet2DModel) is 2D only; volumes use the MONAI backend")
        config = dict(model_cfg.unet2d) if model_cfg.unet2d else {
            "block_out_channels": list(channels), "layers_per_block": res_blocks,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "norm_num_groups": groups, "attention_head_dim": heads}
        return DiffusersUNet(config, in_channels, out_channels, num_class_embeds)
    net = DiffusionModelUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                             num_class_embeds=num_class_embeds, use_flash_attention=flash_attention, **shape)
    if getattr(model_cfg, "gradient_checkpointing", False):
        for block in [*net.down_blocks, net.middle_block, *net.up_blocks]:
            checkpointed(block)
    return net


def checkpointed(module: torch.nn.Module) -> torch.nn.Module:
    """Recompute the module's activations in the backward pass instead of storing them (training only; the
    parameters and the results are unchanged)."""
    from torch.utils.checkpoint import checkpoint
    plain = module.forward

    def forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)
    module.forward = forward
    return module


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel behind the MONAI UNet's call signature: net(x, timesteps, class_labels=None).
    `unet` keeps the diffusers module names, so its state dict is a diffusers state dict."""

    def __init__(self, config: dict, in_channels: int, out_channels: int, num_class_embeds: int | None = None):
        super().__init__()
        from diffusers import UNet2DModel
        config = {**config, "in_channels": in_channels, "out_channels": out_channels}
        if num_class_embeds:
            config.update(num_class_embeds=num_class_embeds, class_embed_type=None)
        try:
            self.unet = UNet2DModel(**config)
        except (TypeError, ValueError, RuntimeError) as err:   # model.unet2d set by hand: one line, no traceback
            raise UserError(f"model.unet2d: diffusers cannot build this UNet2DModel ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None

    def forward(self, x, timesteps, context=None, class_labels=None):
        return self.unet(x, timesteps, class_labels=class_labels).sample
