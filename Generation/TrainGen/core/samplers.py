"""Samplers: plain functions with one signature, registered by name (as in k-diffusion).

    x_next = SAMPLERS[name](strategy, pred, x_t, t, t_next, generator, state)

t and t_next are in the shared time domain [0, 1] (0 is clean); `pred` is the network's prediction at
(x_t, t) in the strategy's target space, and the strategy supplies what the update needs (its coefficients
x_t = a(t) x0 + s(t) noise, and the clean sample predicted from pred). `state` is one dict per sampling run:
multistep samplers keep their history in it, and a sampler that evaluates the network again (Heun) calls
state["model"](x, t). A strategy lists the samplers that fit it in `Strategy.samplers`; adding one is a
function here and its name there. NFE (network evaluations) per run: `nfe(name, steps)`.
"""
from __future__ import annotations

import math

import torch

from medgen.Generation.TrainGen.core.strategies.base import randn_like


def _scalars(strategy, t: float) -> tuple[float, float]:
    a, s = strategy.coefficients(torch.tensor([t], dtype=torch.float64))
    return float(a), float(s)


def _x0(strategy, pred, x_t, t: float) -> torch.Tensor:
    """The predicted clean sample, clipped to [-1, 1] when the strategy says so (pixel-space data range)."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.float64)
    x0 = strategy.predict_x0(pred, x_t, tt)
    return x0.clamp(-1, 1) if getattr(strategy, "clip_sample", False) else x0


def eta_step(strategy, pred, x_t, t: float, t_next: float, generator, eta: float) -> torch.Tensor:
    """Song et al. 2021, eq. 12, for variance-preserving processes (a^2 + s^2 = 1): eta=1 is the ancestral
    DDPM posterior (the 'fixed_small' variance between neighbouring steps), eta=0 deterministic DDIM. The
    predicted x0 is clipped to [-1, 1] (strategy.ddpm.clip_sample, MONAI's clip_sample=True) and the noise direction
    recomputed from it."""
    x0 = _x0(strategy, pred, x_t, t)
    a_t, s_t = _scalars(strategy, t)
    a_n, s_n = _scalars(strategy, t_next)
    eps = (x_t - a_t * x0) / s_t
    var = eta ** 2 * (s_n ** 2 / s_t ** 2) * (1 - (a_t / a_n) ** 2)
    x_next = a_n * x0 + max(s_n ** 2 - var, 0.0) ** 0.5 * eps
    if var > 0:
        x_next = x_next + var ** 0.5 * randn_like(x_t, generator)
    return x_next


def ddpm(strategy, pred, x_t, t, t_next, generator=None, state=None):
    return eta_step(strategy, pred, x_t, t, t_next, generator, eta=1.0)


def ddim(strategy, pred, x_t, t, t_next, generator=None, state=None):
    return eta_step(strategy, pred, x_t, t, t_next, generator, eta=0.0)


def dpmpp_2m(strategy, pred, x_t, t, t_next, generator=None, state=None):
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order solver in data (x0) prediction, for any
    variance-preserving strategy and any prediction type it can turn into x0. The first step and the step to
    the clean end (s = 0) are first order, as diffusers' DPMSolverMultistepScheduler does (lower_order_final,
    final_sigmas_type='zero'); the midpoint form of the second-order correction. x0 is clipped as in eta_step
    (diffusers does not clip: the parity test turns clip_sample off)."""
    state = {} if state is None else state
    x0 = _x0(strategy, pred, x_t, t)
    a_t, s_t = _scalars(strategy, t)
    a_n, s_n = _scalars(strategy, t_next)
    lam_t = math.log(a_t) - math.log(s_t)
    if s_n == 0.0:
        x_next = a_n * x0
    else:
        lam_n = math.log(a_n) - math.log(s_n)
        h = lam_n - lam_t
        phi = math.expm1(-h)                       # exp(-h) - 1
        x_next = (s_n / s_t) * x_t - a_n * phi * x0
        if "x0_prev" in state:
            r = (lam_t - state["lambda_prev"]) / h
            x_next = x_next - 0.5 * a_n * phi * (x0 - state["x0_prev"]) / r
    state["x0_prev"], state["lambda_prev"] = x0, lam_t
    return x_next


def euler(strategy, pred, x_t, t, t_next, generator=None, state=None):
    """One Euler step of the flow ODE dx/dt = -v, with v = x0 - noise the predicted velocity."""
    return x_t + pred * (t - t_next)


def heun(strategy, pred, x_t, t, t_next, generator=None, state=None):
    """Heun's second-order step of the flow ODE (Karras et al. 2022, Alg. 1 without churn): an Euler
    predictor, the velocity evaluated again at its end, and the average of the two; the step to the clean end
    is a plain Euler step (as diffusers' FlowMatchHeunDiscreteScheduler), so n steps cost 2n - 1 evaluations."""
    x_euler = x_t + pred * (t - t_next)
    if t_next == 0.0:
        return x_euler
    if state is None or "model" not in state:
        raise ValueError("heun evaluates the network twice per step: pass state={'model': fn(x, t)}")
    pred_next = state["model"](x_euler, t_next)
    return x_t + 0.5 * (pred + pred_next) * (t - t_next)


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun}


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of a run of `steps` steps (with guidance, each evaluation is one batched call)."""
    return 2 * steps - 1 if sampler == "heun" else steps
