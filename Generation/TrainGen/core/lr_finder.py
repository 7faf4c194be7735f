"""LR range test (Smith 2017): an exponential LR sweep on fixed probe batches.

Each probe batch keeps the same noise and times at every probe, so the losses along the sweep are
comparable; without that the diffusion loss varies more with the drawn t than with the LR. The weights and
optimizer state are restored afterwards."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import torch

from medgen.common.fileio import atomic_write, atomic_write_text


def find_lr(tr, out_dir, lr_min=1e-6, lr_max=1.0, steps=100, n_probe=4) -> float:
    rt, o = tr.rt, tr.cfg.optim
    order = tr.train_data.batch_indices(o.batch_size, 0, tr.cfg.runtime.seed, rt.rank, rt.world)
    probes = []
    for k in range(min(n_probe, len(order))):
        batch = tr.to_device(tr.train_data.batch(order[k]))
        g = torch.Generator(rt.device).manual_seed(1000 + k)
        x0, _ = tr.mode.split(batch, train=False)
        probes.append((batch, torch.randn(x0.shape, generator=g, device=rt.device),
                       tr.strategy.sample_times(len(x0), g, rt.device)))
    saved = copy.deepcopy(tr.net.state_dict()), copy.deepcopy(tr.opt.state_dict())
    lrs, losses, smooth, best = [], [], None, math.inf
    tr.model.train()
    for i in range(steps):
        lr = lr_min * (lr_max / lr_min) ** (i / (steps - 1))
        for group in tr.opt.param_groups:
            group["lr"] = lr
        batch, noise, t = probes[i % len(probes)]
        loss, _, _ = tr.loss(batch, noise, t, generator=torch.Generator(rt.device).manual_seed(i % len(probes)))
        loss.backward()
        tr.opt.step()
        tr.opt.zero_grad(set_to_none=True)
        value = float(rt.mean(loss.detach()))
        smooth = value if smooth is None else 0.8 * smooth + 0.2 * value
        lrs.append(lr)
        losses.append(smooth)
        best = min(best, smooth)
        if not math.isfinite(value) or smooth > 4 * best:
            break
    tr.net.load_state_dict(saved[0])
    tr.opt.load_state_dict(saved[1])
    suggestion = suggest(lrs, losses)
    if rt.is_main:
        atomic_write_text(out_dir / "lr_finder.json",
                          json.dumps({"suggested_lr": suggestion, "lr": lrs, "smoothed_loss": losses}, indent=1))
        plot(lrs, losses, suggestion, out_dir / "lr_finder.png")
    return suggestion


def suggest(lrs, losses) -> float:
    """The LR of the steepest descent of the smoothed loss against log LR, before its minimum."""
    lrs, losses = np.asarray(lrs), np.asarray(losses)
    stop = int(np.argmin(losses)) + 1
    if stop < 3:
        return float(lrs[max(stop - 1, 0)] / 10)
    slope = np.gradient(losses[:stop], np.log10(lrs[:stop]))
    return float(lrs[int(np.argmin(slope))])


def plot(lrs, losses, suggestion, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="r", ls="--", label=f"suggested {suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss (fixed probes)", title="LR range test")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
