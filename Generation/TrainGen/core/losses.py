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
    perceptual term on the predicted clean image. Returns (weighted mean loss, per-sample unweighted loss,
    times)."""

    def __init__(self, strategy, mode, autocast, min_snr: bool = False, gamma: float = 5.0, perceptual=None,
                 perceptual_weight: float = 0.0):
        self.strategy, self.mode, self.autocast = strategy, mode, autocast
        self.min_snr, self.gamma = min_snr, gamma
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight

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
        return loss, per.detach(), t
