"""--batch_size auto: a training batch that fits on this GPU and saturates it, probed with the real settings
(bf16 autocast, channels_last, the same UNet, AdamW state included): the largest that fits, less 10% for
fragmentation and the validation pass, and no larger than where throughput stops growing (plateau_batch).
The learning rate is not changed: optim.lr was chosen for optim.batch_size, and for Adam-family optimizers
the usual rule when the batch grows by a factor k is lr x sqrt(k) (train.py prints the factor).
Probes run eager: torch.compile would recompile for every probed size,
and a compiled step needs less memory than an eager one, so the eager limit is the safe side."""
from __future__ import annotations

from typing import Callable

import torch

from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.latent import sample_shape

SAFETY = 0.9


def largest_fitting(fits: Callable[[int], bool], start: int = 8, limit: int = 4096) -> int:
    """Largest n in [1, limit] with fits(n), for a monotone fits: doubling from `start`, then bisection."""
    if not fits(1):
        raise UserError("--batch_size auto: not even a batch of 1 fits in GPU memory")
    lo, hi = 1, None
    n = max(2, start)
    while n <= limit:
        if fits(n):
            lo, n = n, n * 2
        else:
            hi = n
            break
    hi = hi or limit + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


PLATEAU = 0.95      # the smallest batch within 5% of the best measured throughput is as fast as any larger one


def plateau_batch(rates: dict[int, float], plateau: float = PLATEAU) -> int:
    """The smallest batch size whose throughput (images/s) is within `plateau` of the best measured: beyond the
    point where the GPU is saturated a larger batch only costs memory and optimisation quality (the LR was
    chosen for the configured batch)."""
    best = max(rates.values())
    return min(n for n, r in rates.items() if r >= plateau * best)


def with_margin(n: int) -> int:
    m = max(1, int(n * SAFETY))
    return m - m % 8 if m >= 16 else m


def find_batch_size(cfg, rt, parts) -> int:
    """Probe on this rank's GPU with the run's own network (its weights are restored afterwards); every rank
    takes the smallest result (one all-reduce)."""
    if rt.device.type != "cuda":
        raise UserError("--batch_size auto probes GPU memory and needs CUDA; give a number on CPU")
    mode, strategy, net = parts.mode, parts.strategy, parts.net
    shape = sample_shape(cfg, mode)
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    from medgen.Generation.TrainGen.core.parts import uses_channels_last
    fmt = torch.channels_last if len(shape) == 2 else torch.channels_last_3d
    last = uses_channels_last(cfg, rt.device)
    net = net.to(memory_format=fmt) if last else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=True)

    rates: dict[int, float] = {}

    def step(n: int) -> None:
        x = torch.randn(n, mode.in_channels, *shape, device=rt.device)
        x = x.contiguous(memory_format=fmt) if last else x
        t = strategy.net_time(strategy.sample_times(n, None, rt.device))
        labels = torch.zeros(n, dtype=torch.long, device=rt.device) if mode.class_embeds else None
        with rt.autocast():
            out = net(x, t, class_labels=labels)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fits(n: int) -> bool:
        import time
        try:
            step(n)                                   # the first step allocates (and may run out)
            torch.cuda.synchronize(rt.device)
            t0 = time.perf_counter()
            for _ in range(2):
                step(n)
            torch.cuda.synchronize(rt.device)
            rates[n] = 2 * n / (time.perf_counter() - t0)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()                  # after step()'s tensors went out of scope

    largest = with_margin(largest_fitting(fits, start=max(8, cfg.optim.batch_size)))
    found = min(largest, plateau_batch({n: r for n, r in rates.items() if n <= largest} or {largest: 1.0}))
    net.load_state_dict(saved)
    opt.state.clear()                                 # the probe's AdamW moments
    torch.cuda.empty_cache()
    value = torch.tensor([found], device=rt.device)
    if rt.distributed:
        import torch.distributed as dist
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
