"""Samplers: plain functions with one signature, registered by name (as in k-diffusion).

    x_next = SAMPLERS[name](strategy, pred, x_t, t, t_next, generator)

t and t_next are in the shared time domain [0, 1] (0 is clean); `pred` is the network's prediction at
(x_t, t) in the strategy's target space, and the strategy supplies what the update needs (its coefficients
x_t = a(t) x0 + s(t) noise, and the clean sample predicted from pred). A strategy lists the samplers that
fit it in `Strategy.samplers`; adding one is a function here and its name there.
"""
from __future__ import annotations

import torch

from Generation.TrainGen.core.strategies.base import randn_like


def _scalars(strategy, t: float) -> tuple[float, float]:
    a, s = strategy.coefficients(torch.tensor([t], dtype=torch.float64))
    return float(a), float(s)


def eta_step(strategy, pred, x_t, t: float, t_next: float, generator, eta: float) -> torch.Tensor:
    """Song et al. 2021, eq. 12, for variance-preserving processes (a^2 + s^2 = 1): eta=1 is the ancestral
    DDPM posterior (the 'fixed_small' variance between neighbouring steps), eta=0 deterministic DDIM. The
    predicted x0 is clipped to [-1, 1] (MONAI's clip_sample=True) and the noise direction recomputed from it."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.float64)
    x0 = strategy.predict_x0(pred, x_t, tt).clamp(-1, 1)
    a_t, s_t = _scalars(strategy, t)
    a_n, s_n = _scalars(strategy, t_next)
    eps = (x_t - a_t * x0) / s_t
    var = eta ** 2 * (s_n ** 2 / s_t ** 2) * (1 - (a_t / a_n) ** 2)
    x_next = a_n * x0 + max(s_n ** 2 - var, 0.0) ** 0.5 * eps
    if var > 0:
        x_next = x_next + var ** 0.5 * randn_like(x_t, generator)
    return x_next


def ddpm(strategy, pred, x_t, t, t_next, generator=None):
    return eta_step(strategy, pred, x_t, t, t_next, generator, eta=1.0)


def ddim(strategy, pred, x_t, t, t_next, generator=None):
    return eta_step(strategy, pred, x_t, t, t_next, generator, eta=0.0)


def euler(strategy, pred, x_t, t, t_next, generator=None):
    """One Euler step of the flow ODE dx/dt = -v, with v = x0 - noise the predicted velocity."""
    return x_t + pred * (t - t_next)


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "euler": euler}
