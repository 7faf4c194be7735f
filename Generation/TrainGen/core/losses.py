"""Per-sample diffusion loss and Min-SNR-gamma weighting (Hang et al. 2023).

Min-SNR weights the loss as if it were min(SNR, gamma) * ||x0 - x0_hat||^2. Written in the space the
network predicts:
  epsilon   ||eps err||^2 = SNR ||x0 err||^2                 -> w = min(SNR, g) / SNR
  v         ||v err||^2   = (SNR + 1) ||x0 err||^2 (a^2+s^2=1) -> w = min(SNR, g) / (SNR + 1)
  sample    the x0 loss itself                                -> w = min(SNR, g)
  velocity  rectified flow, x0_hat = x_t + t v_hat, so ||v err||^2 = ||x0 err||^2 / t^2 and with
            SNR = ((1-t)/t)^2, t = 1 / (1 + sqrt(SNR))        -> w = min(SNR, g) / (1 + sqrt(SNR))^2
diffusers once shipped the v case as min(SNR + 1, g) / (SNR + 1) (issue #5654, fixed by PR #6307); its open
issue #9451 asks whether the correct v weight falling towards 0 at high noise is a bug: it is not, it is the
x0-space weight min(SNR, g) written for v, and it is the reason Min-SNR is off by default for rectified flow.
"""
from __future__ import annotations

import torch

from medgen.common.features import perceptual_distance


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return (gamma / snr).clamp(max=1.0)          # = min(SNR, g)/SNR, and 1 at SNR = 0
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "sample":
        return clipped
    if prediction == "velocity":
        return clipped / (1 + snr.sqrt()) ** 2
    raise ValueError(f"no Min-SNR weight for prediction type {prediction!r}")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().flatten(1).mean(1)


class DiffusionLoss:
    """The training objective of every strategy x mode (edm2's loss as an object): the mode splits the batch, the
    strategy draws times and corrupts, the network predicts, each sample's loss is Min-SNR weighted; optionally a
    perceptual term on the predicted clean image and the region-specific contrastive term. Returns (weighted
    mean loss, per-sample unweighted loss, times)."""

    def __init__(self, strategy, mode, autocast, min_snr: bool = False, gamma: float = 5.0, perceptual=None,
                 perceptual_weight: float = 0.0, region_contrast: float = 0.0, margin: float = 0.5):
        self.strategy, self.mode, self.autocast = strategy, mode, autocast
        self.min_snr, self.gamma = min_snr, gamma
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.region_contrast, self.margin = region_contrast, margin

    def __call__(self, model, batch: dict, generator, noise=None, t=None, train: bool = True):
        x0, cond = self.mode.split(batch, train=train, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device) if noise is None else noise
        t = self.strategy.sample_times(len(x0), generator, x0.device) if t is None else t
        x_t, target = self.strategy.corrupt(x0, noise, t)
        with self.autocast():
            pred = self.mode.forward(model, x_t, self.strategy.net_time(t), cond)
        per = per_sample_mse(pred, target)
        w = min_snr_weight(self.strategy.snr(t).to(per), self.gamma, self.strategy.prediction) if self.min_snr else 1.0
        loss = (w * per).mean()
        if self.perceptual is not None:
            x0_hat = self.strategy.predict_x0(pred.float(), x_t, t).clamp(-1, 1)
            with self.autocast():
                percep = perceptual_distance(self.perceptual, (x0_hat + 1) / 2, (x0 + 1) / 2)
            loss = loss + self.perceptual_weight * percep.float().mean()
        if self.region_contrast > 0 and train:
            loss = loss + self.region_contrast * self.contrast(model, batch, pred, x_t, t, generator)
        return loss, per.detach(), t

    def contrast(self, model, batch: dict, pred: torch.Tensor, x_t, t, generator) -> torch.Tensor:
        """Region-specific contrastive term after the idea of MAISI-v2 (Zhao et al. 2025), not its loss (no
        dilation, no ground-truth background term, per-pixel hinge: docs/training.md): in each sample one label
        present in its conditioning mask is relabelled as background and the network predicts again on the same
        x_t and t. Inside the region the two predictions must differ by at least the margin (a hinge on the
        channel-mean absolute difference), outside it they must agree (the difference itself), each averaged
        over its pixels. It asks the conditioning of each region to act where the region is and only there."""
        masks = batch["masks"]
        ids = torch.tensor(self.mode.vocab.ids, device=masks.device, dtype=masks.dtype)
        present = (masks.flatten(1)[:, None, :] == ids[None, :, None]).any(2).float()   # (N, K), no host sync
        has = present.sum(1, keepdim=True) > 0
        pick = torch.multinomial(present + (~has).float(), 1, generator=generator)[:, 0]   # one present label each
        region = ((masks == ids[pick].view(-1, *[1] * (masks.dim() - 1))) & has.view(-1, *[1] * (masks.dim() - 1)))
        region = region.float()
        _, cond_cf = self.mode.split({**batch, "masks": masks * (1 - region)}, train=True, generator=generator)
        with self.autocast():
            pred_cf = self.mode.forward(model, x_t, self.strategy.net_time(t), cond_cf)
        diff = (pred.float() - pred_cf.float()).abs().mean(1, keepdim=True)
        dims = tuple(range(1, diff.dim()))
        inside = (torch.relu(self.margin - diff) * region).sum(dims) / region.sum(dims).clamp(min=1)
        outside = (diff * (1 - region)).sum(dims) / (1 - region).sum(dims).clamp(min=1)
        has = has.view(-1).float()
        return ((inside + outside) * has).sum() / has.sum().clamp(min=1)
