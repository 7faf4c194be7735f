"""A strategy says HOW to diffuse: training times, corruption, SNR, and the sampling time grid.

Every strategy shares one time domain at its interface: t in [0, 1], clean at 0, pure noise at 1 (a discrete
schedule such as DDPM's integer steps is an internal detail), and writes its forward process as
x_t = a(t) * x0 + s(t) * noise, so the SNR is (a/s)^2 for all. `net_time(t)` is what the network is given
(DDPM: its integer step; rectified flow: t * num_timesteps, MONAI's convention), so checkpoints keep their
meaning. Sampler steps are plain functions in core/samplers.py; a strategy names those that fit it.
Subclass, then register the class in STRATEGIES (core/strategies/__init__.py) to add one.
"""
from __future__ import annotations

import torch


def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) -> broadcastable (B, 1, 1, 1) in like's dtype."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like x, from one generator or from one generator per sample (a list):
    per-sample generators make a sample's noise independent of the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                            for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class DiffusionStrategy:
    """The base class of every strategy (the name the original research code documents); `Strategy` is the
    same class."""
    name = "base"
    prediction = "epsilon"            # what the network predicts: epsilon, v, sample or velocity
    samplers: tuple[str, ...] = ()
    default_sampler = ""
    default_steps: dict[str, int] = {}
    min_snr_default = False           # whether Min-SNR weighting is on when optim.min_snr is not set

    def __init__(self, cfg):
        self.cfg = cfg
        self.num_timesteps = cfg.num_timesteps
        self.shape: tuple[int, ...] | None = None

    def bind_shape(self, shape: tuple[int, ...]) -> "DiffusionStrategy":
        """The spatial shape of the data (H, W) or (D, H, W), for schedules that depend on resolution; the
        trainer and the generator bind the same shape, so training and sampling agree."""
        self.shape = tuple(int(n) for n in shape)
        return self

    # --- training (t in [0, 1], 0 clean)
    def sample_times(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        raise NotImplementedError

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value the network is conditioned on (float32)."""
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) with x_t = a * x0 + s * noise, per sample, float64."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(x_t, regression target)."""
        a, s = (expand(c, x0) for c in self.coefficients(t))
        return a * x0 + s * noise, self.target(x0, noise, t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t)
        return (a / s) ** 2

    def predict_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- sampling
    def timesteps(self, num_steps: int, sampler: str) -> list[tuple[float, float]]:
        """[(t, t_next), ...] from pure noise (1) to clean (0)."""
        raise NotImplementedError

    def check_sampler(self, sampler: str | None) -> str:
        sampler = sampler or self.default_sampler
        if sampler not in self.samplers:
            from medgen.common.errors import UserError
            raise UserError(f"sampler {sampler!r} does not fit strategy {self.name!r} "
                            f"(choose from {', '.join(self.samplers)})")
        return sampler


Strategy = DiffusionStrategy
