"""--batch_size auto: the largest training batch that fits on this GPU, probed with the real settings
(bf16 autocast, channels_last, the same UNet, AdamW state included), then 90% of it as a safety margin for
fragmentation and the validation pass. Probes run eager: torch.compile would recompile for every probed size,
and a compiled step needs less memory than an eager one, so the eager limit is the safe side."""
from __future__ import annotations

from typing import Callable

import torch

from common.errors import UserError
from Generation.TrainGen.core.latent import sample_shape

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
    fmt = torch.channels_last if len(shape) == 2 else torch.channels_last_3d
    net = net.to(memory_format=fmt) if cfg.runtime.channels_last else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=True)

    def fits(n: int) -> bool:
        try:
            x = torch.randn(n, mode.in_channels, *shape, device=rt.device)
            x = x.contiguous(memory_format=fmt) if cfg.runtime.channels_last else x
            t = strategy.net_time(strategy.sample_times(n, None, rt.device))
            labels = torch.zeros(n, dtype=torch.long, device=rt.device) if mode.class_embeds else None
            with rt.autocast():
                out = net(x, t, class_labels=labels)
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(rt.device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    found = with_margin(largest_fitting(fits, start=max(8, cfg.optim.batch_size)))
    net.load_state_dict(saved)
    del opt, saved
    torch.cuda.empty_cache()
    value = torch.tensor([found], device=rt.device)
    if rt.distributed:
        import torch.distributed as dist
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
