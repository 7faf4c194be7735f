"""DDPM (Ho et al. 2020) with epsilon or v prediction (Salimans & Ho 2022), ancestral and DDIM sampling.

The beta schedule (linear or cosine) comes from MONAI's DDPMScheduler. Both samplers are one step
(Song et al. 2021, eq. 12) between any two times: eta=1 is ancestral DDPM (the posterior q(x_{t-1}|x_t, x0)
with the 'fixed_small' variance when t_next = t - 1), eta=0 is deterministic DDIM. The predicted x0 is
clipped to [-1, 1] as in MONAI's schedulers (clip_sample=True).
"""
from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler

from Generation.TrainGen.core.strategies.base import Strategy, expand, randn_like

SCHEDULES = {"linear": "linear_beta", "cosine": "cosine"}


class DDPMStrategy(Strategy):
    name = "ddpm"
    samplers = ("ddpm", "ddim")
    default_sampler = "ddpm"
    # Min-SNR-5 speeds DDPM training up several-fold (Hang et al. 2023, Fig. 1) by capping the low-noise steps'
    # weight; it leaves the high-noise end, where sampling starts, at full weight for epsilon prediction.
    min_snr_default = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prediction = cfg.prediction
        sched = DDPMScheduler(num_train_timesteps=cfg.num_timesteps, schedule=SCHEDULES[cfg.schedule])
        self.alphas_cumprod = sched.alphas_cumprod.double()
        self.default_steps = {"ddpm": cfg.num_timesteps, "ddim": 50}

    def _abar(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        ab = self.alphas_cumprod.to(t.device)[t.clamp(min=0).long()]
        return torch.where(t < 0, torch.ones_like(ab), ab)  # t = -1 is the clean end

    def sample_times(self, n, generator, device):
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def coefficients(self, t):
        ab = self._abar(t)
        return ab.sqrt(), (1 - ab).sqrt()

    def target(self, x0, noise, t):
        if self.prediction == "epsilon":
            return noise
        a, s = (expand(c, x0) for c in self.coefficients(t))
        return a * noise - s * x0

    def predict_x0(self, pred, x_t, t):
        a, s = (expand(c, x_t) for c in self.coefficients(t))
        return (x_t - s * pred) / a if self.prediction == "epsilon" else a * x_t - s * pred

    def timesteps(self, num_steps, sampler):
        ts = torch.linspace(self.num_timesteps - 1, 0, num_steps).round().long().unique_consecutive().tolist()
        return list(zip(ts, ts[1:] + [-1]))

    def step(self, pred, x_t, t, t_next, sampler, generator=None):
        tt = torch.full((x_t.shape[0],), t, device=x_t.device)
        x0 = self.predict_x0(pred, x_t, tt).clamp(-1, 1)
        ab_t, ab_n = float(self._abar(t)), float(self._abar(t_next))
        eps = (x_t - ab_t ** 0.5 * x0) / (1 - ab_t) ** 0.5
        eta = 1.0 if sampler == "ddpm" else 0.0
        var = eta ** 2 * (1 - ab_n) / (1 - ab_t) * (1 - ab_t / ab_n)
        x_next = ab_n ** 0.5 * x0 + max(1 - ab_n - var, 0.0) ** 0.5 * eps
        if var > 0:
            x_next = x_next + var ** 0.5 * randn_like(x_t, generator)
        return x_next
