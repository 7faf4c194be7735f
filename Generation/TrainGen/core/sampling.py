"""One sampling loop for every strategy, sampler and mode: the strategy gives the time grid in [0, 1] and the
network's time value, a sampler function (core/samplers.py) steps from t to t_next, the mode builds the
network input and applies classifier-free guidance."""
from __future__ import annotations

import torch

from medgen.Generation.TrainGen.core.samplers import SAMPLERS


@torch.no_grad()
def sample(model, strategy, mode, cond: dict, noise: torch.Tensor, sampler: str | None = None,
           num_steps: int | None = None, guidance: float = 1.0, generator=None, autocast=None,
           trajectory: list | None = None) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) into samples in [-1, 1]; appends intermediate states to `trajectory`."""
    sampler = strategy.check_sampler(sampler)
    num_steps = num_steps or strategy.default_steps[sampler]
    x = noise
    step = SAMPLERS[sampler]

    def predict(x_in: torch.Tensor, t: float) -> torch.Tensor:
        tt = strategy.net_time(torch.full((x_in.shape[0],), t, device=x_in.device, dtype=torch.float64))
        with autocast() if autocast else torch.autocast(x_in.device.type, enabled=False):
            return mode.forward(model, x_in, tt, cond, guidance).float()
    state = {"model": predict}
    for t, t_next in strategy.timesteps(num_steps, sampler):
        x = step(strategy, predict(x, t), x, t, t_next, generator, state)
        if trajectory is not None:
            trajectory.append(x)
    return x
