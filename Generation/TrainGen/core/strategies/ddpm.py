"""DDPM (Ho et al. 2020) with epsilon or v prediction (Salimans & Ho 2022); ancestral, DDIM and DPM-Solver++(2M)
sampling.

The beta schedule (linear or cosine) comes from MONAI's DDPMScheduler. Its integer steps k = 0..T-1 sit at
t = (k + 1) / T of the shared time domain, and t = 0 is the clean sample (abar = 1); the network is given k.
Both samplers are core/samplers.py's eta step between any two times (ancestral eta=1, DDIM eta=0).
"""
from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler

from medgen.Generation.TrainGen.core.strategies.base import Strategy, expand

SCHEDULES = {"linear": "linear_beta", "cosine": "cosine"}


class DDPMStrategy(Strategy):
    name = "ddpm"
    samplers = ("ddpm", "ddim", "dpmpp_2m")
    default_sampler = "ddpm"
    # Min-SNR-5 speeds DDPM training up several-fold (Hang et al. 2023, Fig. 1) by capping the low-noise steps'
    # weight; it leaves the high-noise end, where sampling starts, at full weight for epsilon prediction.
    min_snr_default = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prediction = cfg.ddpm.prediction
        self.clip_sample = cfg.ddpm.clip_sample is not False    # None: on; build_parts turns it off for latents
        sched = DDPMScheduler(num_train_timesteps=cfg.num_timesteps, schedule=SCHEDULES[cfg.ddpm.schedule])
        self.alphas_cumprod = sched.alphas_cumprod.double()
        self._tables: dict[torch.device, torch.Tensor] = {}   # one copy per device: no host-device copy per step
        self.default_steps = {"ddpm": cfg.num_timesteps, "ddim": 50, "dpmpp_2m": 20}

    def step_index(self, t) -> torch.Tensor:
        """The integer DDPM step of t in [0, 1] (-1 for the clean end)."""
        return (torch.as_tensor(t, dtype=torch.float64) * self.num_timesteps).round().long() - 1

    def _abar(self, t) -> torch.Tensor:
        k = self.step_index(t)
        table = self._tables.get(k.device)
        if table is None:
            table = self._tables[k.device] = self.alphas_cumprod.to(k.device)
        ab = table[k.clamp(min=0)]
        return torch.where(k < 0, torch.ones_like(ab), ab)  # t = 0 is the clean end

    def sample_times(self, n, generator, device):
        k = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        return (k + 1).double() / self.num_timesteps

    def net_time(self, t):
        return self.step_index(t).float()

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
        if sampler == "dpmpp_2m":   # diffusers' 'linspace' spacing: n steps from T-1, the last one to the clean end
            ks = torch.linspace(0, self.num_timesteps - 1, num_steps + 1, dtype=torch.float64).round().long()
            ks = ks.flip(0)[:-1].unique_consecutive().tolist()
            ts = [(k + 1) / self.num_timesteps for k in ks]
            return list(zip(ts, ts[1:] + [0.0]))
        ks = torch.linspace(self.num_timesteps - 1, 0, num_steps).round().long().unique_consecutive().tolist()
        ts = [(k + 1) / self.num_timesteps for k in ks]
        return list(zip(ts, ts[1:] + [0.0]))
