"""What a training run tracks between log lines, kept on the device so that the step never syncs: the mean loss
and gradient norm of the steps that were applied, the loss per tenth of the time range, and the non-finite
guard (skipped steps, the current and the worst run of consecutive skips). Read back once per log interval."""
from __future__ import annotations

import time

import torch

from medgen.common.errors import UserError

N_BINS = 10  # loss is also logged per tenth of the time range


class StepStats:
    def __init__(self, device, world: int = 1):
        self.device, self.world = device, world
        z = lambda: torch.zeros((), device=device)  # noqa: E731
        self.health = {"skipped": z(), "streak": z(), "worst": z()}
        self.skipped, self.streak = 0, 0          # as last read back
        self.reset()

    def reset(self) -> None:
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.sums = {"loss": z(), "grad_norm": z(), "n": z()}
        self.t0, self.images = time.perf_counter(), 0
        self.bin_sum = torch.zeros(N_BINS, device=self.device)
        self.bin_count = torch.zeros(N_BINS, device=self.device)

    def record(self, per: torch.Tensor, t: torch.Tensor) -> None:
        """One micro-batch's per-sample losses at their times."""
        bins = (t.float() * N_BINS).long().clamp(0, N_BINS - 1)
        self.bin_sum.index_add_(0, bins, per.float())
        self.bin_count.index_add_(0, bins, torch.ones_like(per, dtype=torch.float32))
        self.images += len(per) * self.world

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor, found_inf: torch.Tensor) -> None:
        """One optimizer step: counted when applied, and in the guard's runs when skipped (found_inf 1)."""
        ok = found_inf == 0
        h = self.health
        h["skipped"] += found_inf
        h["streak"] = (h["streak"] + found_inf) * found_inf
        h["worst"] = torch.maximum(h["worst"], h["streak"])
        self.sums["loss"] += torch.where(ok, loss, 0.0)
        self.sums["grad_norm"] += torch.where(ok, grad_norm.detach(), 0.0)
        self.sums["n"] += ok.float()

    def check_health(self, max_nonfinite: int, where: str, say) -> None:
        """Read the guard (one sync): say how many steps were skipped since the last read, stop after
        max_nonfinite consecutive ones. `where`: 'optimizer step S (epoch E)'."""
        h = self.health
        skipped, worst, streak = (int(v) for v in torch.stack([h["skipped"], h["worst"], h["streak"]]).tolist())
        if skipped > self.skipped:
            say(f"non-finite loss or gradient: {skipped - self.skipped} step(s) skipped up to {where}; "
                f"{skipped} so far")
        self.skipped = skipped
        if worst >= max_nonfinite:
            raise UserError(f"stopping: {worst} consecutive non-finite steps by {where}; lower optim.lr or check "
                            "the data")
        h["worst"].copy_(h["streak"])
        self.streak = streak

    def restore(self, skipped: int) -> None:
        """After a resume: the count of skipped steps the checkpoint recorded."""
        self.skipped = skipped
        self.health["skipped"].fill_(skipped)

    def scalars(self, lr: float) -> dict | None:
        """The log line's scalars since the last one (None when no step ran), then a fresh interval."""
        if self.images == 0:
            return None
        n = self.sums["n"].clamp(min=1)
        loss, grad_norm = (torch.stack([self.sums["loss"], self.sums["grad_norm"]]) / n).tolist()  # one read
        out = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr,
               "train/images_per_s": self.images / (time.perf_counter() - self.t0),
               "train/skipped_steps": self.skipped}
        counts, means = self.bin_count.tolist(), (self.bin_sum / self.bin_count.clamp(min=1)).tolist()
        for i, (c, v) in enumerate(zip(counts, means)):
            if c > 0:
                out[f"loss_by_t/{i / N_BINS:.1f}-{(i + 1) / N_BINS:.1f}"] = v
        self.reset()
        return out
