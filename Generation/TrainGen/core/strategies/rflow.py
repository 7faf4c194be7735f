"""Rectified Flow (Liu et al. 2022), numerically MONAI's RFlowScheduler.

x_t = (1 - t) * x0 + t * noise with t in [0, 1]; the network predicts the velocity x0 - noise and is given
t * num_timesteps (RFlowScheduler's time scale); Euler steps x_{t_next} = x_t + v * (t - t_next) are
core/samplers.py's `euler` (identical to RFlowScheduler.add_noise / .step). Training times: uniform, or
logit-normal (Esser et al. 2024, SD3), which favours the middle of the path. A timestep shift
t' = s t / (1 + (s - 1) t) (SD3; strategy.rflow.shift, or resolution-dependent with shift_base, as MONAI's
RFlowScheduler) warps the training times and the sampling grid with the same function. Samplers: Euler, and
Heun (second order, 2n - 1 network evaluations for n steps).
"""
from __future__ import annotations

import torch

from medgen.Generation.TrainGen.core.strategies.base import Strategy, expand


class RFlowStrategy(Strategy):
    name = "rflow"
    prediction = "velocity"
    samplers = ("euler", "heun")
    default_sampler = "euler"
    default_steps = {"euler": 30, "heun": 15}
    # Off by default: for the velocity target the weight min(SNR, 5) / (1 + sqrt(SNR))^2 falls to 0.01 at t = 0.9,
    # so the noisiest 30% of the path, where sampling starts, gets about 6% of the loss weight; SD3's flow recipe
    # uses no such weighting (Esser et al. 2024). Measured on the demo data: BENCHMARKS.md, "Min-SNR for rflow".
    min_snr_default = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.shift = float(cfg.rflow.shift)

    def bind_shape(self, shape):
        super().bind_shape(shape)
        self.shift = resolution_shift(self.cfg.rflow.shift, self.cfg.rflow.shift_base, self.shape)
        return self

    def warp(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep shift (identity at shift 1); keeps 0 and 1 fixed."""
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sample_times(self, n, generator, device):
        if self.cfg.rflow.time_sampling == "logit-normal":
            return self.warp(torch.sigmoid(torch.randn(n, generator=generator, device=device)))
        return self.warp(torch.rand(n, generator=generator, device=device))

    def net_time(self, t):
        return torch.as_tensor(t).float() * self.num_timesteps

    def coefficients(self, t):
        s = torch.as_tensor(t).double()
        return 1 - s, s

    def target(self, x0, noise, t):
        return x0 - noise

    def predict_x0(self, pred, x_t, t):
        _, s = self.coefficients(t)
        return x_t + expand(s, x_t) * pred

    def timesteps(self, num_steps, sampler):
        ts = self.warp(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)).tolist()
        return list(zip(ts[:-1], ts[1:]))


def resolution_shift(shift: float, base: int | None, shape: tuple[int, ...] | None) -> float:
    """shift, times (numel / base^dims)^(1/dims) when base is set (MONAI RFlowScheduler's timestep transform
    with base_img_size_numel = base^dims)."""
    if base is None or not shape:
        return float(shift)
    numel = 1
    for n in shape:
        numel *= n
    return float(shift) * (numel / base ** len(shape)) ** (1.0 / len(shape))
