"""Rectified Flow (Liu et al. 2022) in MONAI's RFlowScheduler convention.

x_t = (1 - t/T) * x0 + (t/T) * noise with t in [0, T]; the network predicts the velocity x0 - noise and
Euler steps x_{t_next} = x_t + v * (t - t_next) / T (identical to RFlowScheduler.add_noise / .step).
Training times: uniform, or logit-normal (Esser et al. 2024, SD3), which favours the middle of the path.
"""
from __future__ import annotations

import torch

from Generation.TrainGen.core.strategies.base import Strategy, expand


class RFlowStrategy(Strategy):
    name = "rflow"
    prediction = "velocity"
    samplers = ("euler",)
    default_sampler = "euler"
    default_steps = {"euler": 30}
    # Off by default: for the velocity target the weight min(SNR, 5) / (1 + sqrt(SNR))^2 falls to 0.01 at t = 0.9,
    # so the noisiest 30% of the path, where sampling starts, gets about 6% of the loss weight; SD3's flow recipe
    # uses no such weighting (Esser et al. 2024). Measured on the demo data: BENCHMARKS.md, "Min-SNR for rflow".
    min_snr_default = False

    def sample_times(self, n, generator, device):
        if self.cfg.time_sampling == "logit-normal":
            u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
        else:
            u = torch.rand(n, generator=generator, device=device)
        return u * self.num_timesteps

    def coefficients(self, t):
        s = torch.as_tensor(t).double() / self.num_timesteps
        return 1 - s, s

    def target(self, x0, noise, t):
        return x0 - noise

    def predict_x0(self, pred, x_t, t):
        _, s = self.coefficients(t)
        return x_t + expand(s, x_t) * pred

    def timesteps(self, num_steps, sampler):
        ts = torch.linspace(self.num_timesteps, 0, num_steps + 1).tolist()
        return list(zip(ts[:-1], ts[1:]))

    def step(self, pred, x_t, t, t_next, sampler, generator=None):
        return x_t + pred * ((t - t_next) / self.num_timesteps)
