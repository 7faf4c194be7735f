"""Regions for inpainting: the region a lesion is painted into (the lesion and a margin around it, where the
seam is), random lesion-shaped regions for training on healthy tissue, and the known-region constraint of
sampling (RePaint, Lugmayr et al. 2022): after every step the pixels outside the region are the known image
noised to the step's time, so the sample grows into its surroundings; the final composition takes them from
the known image as they are, bit for bit."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medgen.Generation.TrainGen.core.strategies.base import expand, randn_like


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """(N, 1, ...) {0, 1} grown by px pixels (voxels), the square (cube) neighbourhood."""
    if px <= 0:
        return mask.float()
    pool = F.max_pool2d if mask.dim() == 4 else F.max_pool3d
    return pool(mask.float(), 2 * px + 1, stride=1, padding=px)


def random_blobs(foreground: torch.Tensor, generator, low: float = 0.06, high: float = 0.16) -> torch.Tensor:
    """(N, 1, ...) lesion-shaped regions (radius `low` to `high` of the side, a wobbling border) centred on a
    random foreground pixel of each item (anywhere when it has none), drawn on the device with no host sync."""
    n, dims = foreground.shape[0], foreground.dim() - 2
    shape = foreground.shape[2:]
    flat = foreground.flatten(1).float()
    weights = torch.where(flat.sum(1, keepdim=True) > 0, flat, torch.ones_like(flat))
    centre = torch.multinomial(weights, 1, generator=generator)[:, 0]
    axes = [torch.arange(s, device=foreground.device, dtype=torch.float32) for s in shape]
    grid = torch.meshgrid(*axes, indexing="ij")
    coords, rest = [], centre
    for s in reversed(shape):                               # unravel the flat centre index
        coords.insert(0, (rest % s).float())
        rest = torch.div(rest, s, rounding_mode="floor")
    u = torch.rand(n, 4, generator=generator, device=foreground.device)
    radius = (low + (high - low) * u[:, 0]) * min(shape)
    d2 = sum((g[None] - c.view(-1, *[1] * dims)) ** 2 for g, c in zip(grid, coords))
    angle = torch.atan2(grid[-2][None] - coords[-2].view(-1, *[1] * dims),
                        grid[-1][None] - coords[-1].view(-1, *[1] * dims))
    lobes = (3 + (u[:, 1] * 4).floor()).view(-1, *[1] * dims)
    wobble = 1 + 0.25 * torch.sin(lobes * angle + 2 * math.pi * u[:, 2].view(-1, *[1] * dims))
    return (d2.sqrt() < radius.view(-1, *[1] * dims) * wobble).float().unsqueeze(1)


def constrain(strategy, x: torch.Tensor, known: torch.Tensor, hole: torch.Tensor, t_next: float,
              generator=None) -> torch.Tensor:
    """x at time t_next with the pixels outside the hole replaced by the known clean image (in [-1, 1]) noised to
    t_next: a(t_next) known + s(t_next) noise, fresh noise from the sample's generator(s)."""
    a, s = strategy.coefficients(torch.full((x.shape[0],), t_next, dtype=torch.float64, device=x.device))
    noised = expand(a, x) * known + expand(s, x) * randn_like(x, generator)
    return hole * x + (1 - hole) * noised


def renoise(strategy, x: torch.Tensor, t_from: float, t_to: float, generator=None) -> torch.Tensor:
    """A RePaint jump back in time: x at t_from (< t_to) to t_to along the forward process,
    x_to = (a_to / a_from) x_from + sqrt(s_to^2 - (a_to / a_from)^2 s_from^2) noise, which keeps the marginal
    a(t) x0 + s(t) noise for DDPM and rectified flow alike."""
    n = x.shape[0]
    a_f, s_f = strategy.coefficients(torch.full((n,), t_from, dtype=torch.float64, device=x.device))
    a_t, s_t = strategy.coefficients(torch.full((n,), t_to, dtype=torch.float64, device=x.device))
    ratio = a_t / a_f
    sigma = (s_t ** 2 - ratio ** 2 * s_f ** 2).clamp(min=0).sqrt()
    return expand(ratio, x) * x + expand(sigma, x) * randn_like(x, generator)


def compose(generated: torch.Tensor, known: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The output in data space ([0, 1]): the generated pixels inside the hole, the known ones, exactly, outside."""
    return torch.where(hole > 0.5, generated, known)
