"""Mask control for a frozen generator (ControlNet, Zhang et al. 2023; MONAI's ControlNet, as MAISI uses it).

`train.py --control_from RUN` keeps the run's DiffusionModelUNet frozen and trains a MONAI ControlNet beside it:
a copy of the UNet's encoder (initialised from the frozen weights) that reads the mask and adds its features, through
zero-initialised convolutions, to the frozen UNet's skip connections. At the start the ControlNet adds nothing, so
the model begins as the frozen generator and learns only where the mask should change it. The frozen run is an
unconditional (`image`) or class model, in pixel or latent space; the mask is coded with the vocabulary (one
channel per label) and, in latent space, area-downsampled to the latent grid.

ControlledUNet takes the mask as extra input channels after the noisy sample, so the mode, the trainer and the
samplers see one network; ControlledMode gives it the mask. A checkpoint records the frozen run (its file and
SHA-256) and the conditioning scale; a frozen run whose weights changed since, or another frozen run, is refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.controlnet import ControlNet

from medgen.common.data import MASK_ROLE
from medgen.common.errors import UserError
from medgen.common.labels import encode


class ControlledUNet(torch.nn.Module):
    """net(cat([x, mask channels]), t, class_labels) -> the frozen UNet's prediction with the ControlNet's
    residuals added (scaled by `scale`)."""

    def __init__(self, base: torch.nn.Module, control: ControlNet, out_channels: int, scale: float = 1.0):
        super().__init__()
        self.base, self.control, self.out_channels, self.scale = base, control, out_channels, scale
        self.base.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()                       # frozen: its normalisation and dropout stay as trained
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels=None, context=None):
        sample, mask = x[:, :self.out_channels], x[:, self.out_channels:]
        down, mid = self.control(sample, timesteps, controlnet_cond=mask, conditioning_scale=self.scale,
                                 class_labels=class_labels)
        return self.base(sample, timesteps, class_labels=class_labels, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)


def build_controlnet(model_cfg, base: torch.nn.Module, in_channels: int, mask_channels: int, spatial_dims: int,
                     num_class_embeds: int | None = None) -> ControlNet:
    """A ControlNet shaped like the frozen MONAI UNet (the same shape arguments), its encoder and embeddings
    initialised from the frozen weights by name; its zero convolutions start at zero."""
    from monai.networks.nets import DiffusionModelUNet
    from medgen.Generation.TrainGen.core.network import unet_shape
    if not isinstance(base, DiffusionModelUNet):
        raise UserError("--control_from: a ControlNet needs a MONAI DiffusionModelUNet run (model.backend monai)")
    net = ControlNet(spatial_dims=spatial_dims, in_channels=in_channels, num_class_embeds=num_class_embeds,
                     conditioning_embedding_in_channels=mask_channels, conditioning_embedding_num_channels=(16,),
                     use_flash_attention=True, **unet_shape(model_cfg, spatial_dims))
    copy_matching(net, base.state_dict())
    return net


def copy_matching(net: torch.nn.Module, state: dict) -> int:
    """Load the entries of `state` whose names and shapes `net` shares (a ControlNet's encoder and embeddings from
    its UNet's); returns how many."""
    own = net.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict({**own, **shared})
    return len(shared)


class ControlledMode:
    """A frozen run's mode with mask control: the data bring masks, the network gets their coding as extra input
    channels (area-downsampled to a latent grid), everything else is the frozen mode's."""

    def __init__(self, mode):
        self.mode = mode

    def __getattr__(self, name):            # everything else is the wrapped mode's
        return getattr(self.mode, name)

    @property
    def condition_roles(self) -> list[str]:
        return [MASK_ROLE]

    @property
    def needs(self) -> str:
        return "mask"

    @property
    def makes_masks(self) -> bool:
        return False

    @property
    def in_channels(self) -> int:
        return self.mode.in_channels + self.vocab.channels

    def roles(self) -> list[str]:
        return list(dict.fromkeys(self.mode.roles() + [MASK_ROLE]))

    def written_roles(self) -> list[str]:
        return [MASK_ROLE] + [r for r in self.mode.generated_roles if r != MASK_ROLE]

    def split(self, batch: dict, train: bool = False, generator=None):
        x0, cond = self.mode.split(batch, train=train, generator=generator)
        return x0, {**cond, "control": encode(batch["masks"], self.vocab) * 2 - 1}

    def condition(self, values: torch.Tensor) -> dict:
        return {"control": encode(values[:, :1], self.vocab) * 2 - 1}

    def forward(self, model, x_t, t, cond, guidance: float = 1.0):
        control = cond["control"].to(x_t.dtype)
        if control.shape[2:] != x_t.shape[2:]:
            control = F.interpolate(control.float(), size=x_t.shape[2:], mode="area").to(x_t.dtype)
        rest = {k: v for k, v in cond.items() if k != "control"}
        return self.mode.forward(model, torch.cat([x_t, control], 1), t, rest, guidance)

    def outputs(self, x):
        return self.mode.outputs(x)
