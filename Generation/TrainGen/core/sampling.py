"""One sampling loop for every strategy and mode: the strategy steps from t to t_next, the mode builds the
network input and applies classifier-free guidance."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, strategy, mode, cond: dict, noise: torch.Tensor, sampler: str | None = None,
           num_steps: int | None = None, guidance: float = 1.0, generator=None, autocast=None,
           trajectory: list | None = None) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) into samples in [-1, 1]; appends intermediate states to `trajectory`."""
    sampler = strategy.check_sampler(sampler)
    num_steps = num_steps or strategy.default_steps[sampler]
    x = noise
    for t, t_next in strategy.timesteps(num_steps, sampler):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        with autocast() if autocast else torch.autocast(x.device.type, enabled=False):
            pred = mode.forward(model, x, tt, cond, guidance)
        x = strategy.step(pred.float(), x, t, t_next, sampler, generator)
        if trajectory is not None:
            trajectory.append(x)
    return x
