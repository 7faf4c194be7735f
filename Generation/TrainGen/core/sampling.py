"""One sampling loop for every strategy, sampler and mode: the strategy gives the time grid in [0, 1] and the
network's time value, a sampler function (core/samplers.py) steps from t to t_next, the mode builds the
network input and applies classifier-free guidance. With `known` (a clean image in [-1, 1] and the region to
regenerate) the pixels outside the region follow the known image (core/inpainting.py): after every step
(RePaint), with `jumps` - 1 resampling jumps per step, or with replace_every False only at the end."""
from __future__ import annotations

import torch

from medgen.Generation.TrainGen.core.inpainting import constrain, renoise
from medgen.Generation.TrainGen.core.samplers import SAMPLERS


@torch.no_grad()
def sample(model, strategy, mode, cond: dict, noise: torch.Tensor, sampler: str | None = None,
           num_steps: int | None = None, guidance: float = 1.0, generator=None, autocast=None,
           trajectory: list | None = None, known: tuple | None = None, jumps: int = 1,
           replace_every: bool = True) -> torch.Tensor:
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
    if known is None and "known" in cond:          # an inpainting mode's conditioning carries its known pixels
        known = (cond["known"], cond["hole"])
    repaint = known is not None and replace_every
    for t, t_next in strategy.timesteps(num_steps, sampler):
        for jump in range(jumps if repaint else 1):
            if jump:                                   # RePaint: back to t, and the step again
                x = renoise(strategy, x, t_next, t, generator)
                state = {"model": predict}             # a multistep sampler's history ends at a jump
            x = step(strategy, predict(x, t), x, t, t_next, generator, state)
            if repaint:
                x = constrain(strategy, x, known[0], known[1], t_next, generator)
        if trajectory is not None:
            trajectory.append(x)
    return x
