"""Models for sampling: a run folder or checkpoint (or a glob naming exactly one) loaded with its EMA weights,
strategy and mode, wrapped so that each sample's output does not depend on the batch it is computed in."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medgen.Generation.TrainGen.core.checkpoint import model_weights
from medgen.Generation.TrainGen.core.exported import read_model
from medgen.Generation.TrainGen.core.config import stored_config
from medgen.common.errors import UserError
from medgen.common.names import check_name
from medgen.common.features import sha256_of
from medgen.Generation.TrainGen.core.latent import check_unchanged, sample_shape
from medgen.Generation.TrainGen.core.parts import build_network, build_parts


class RowwiseLinear(torch.nn.Module):
    """An nn.Linear (sharing its weight and bias) whose (B, C) inputs are computed one row at a time in a single
    bmm: every row goes through the M = 1 kernel whatever B is. A plain GEMM picks its kernel by B, and the
    time-embedding rows would then round differently in a batch of 2 than in a batch of 8."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        w = self.weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)
        y = torch.bmm(x.unsqueeze(1), w).squeeze(1)
        return y + self.bias if self.bias is not None else y


class BatchInvariant(torch.nn.Module):
    """Wraps a UNet so that each sample's output does not depend on the batch it is computed in (checked on
    CPU for batch sizes 1-16). Two things are not batch-invariant by themselves: the Linear layers on (B, C)
    embeddings (each replaced, in the wrapped network, by a RowwiseLinear sharing its parameters), and
    convolutions on a single image, for which oneDNN picks another algorithm (a batch of one is run as two
    copies). Load the weights before wrapping: the wrapped network is for sampling only."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, RowwiseLinear(child))
        self.net = net

    def forward(self, x, timesteps, class_labels=None):
        if x.shape[0] > 1:
            return self.net(x, timesteps, class_labels=class_labels)
        two = lambda v: None if v is None else v.expand(2, *v.shape[1:])  # noqa: E731
        return self.net(two(x), two(timesteps), class_labels=two(class_labels))[:1]


def resolve_glob(path: str, flag: str) -> Path:
    """path itself, or the single file or folder a glob pattern in it matches (else a UserError listing them)."""
    import glob
    if not glob.has_magic(str(path)):
        return Path(path)
    matches = sorted(glob.glob(str(path)))
    if len(matches) != 1:
        shown = "; ".join(matches[:10]) + (f"; ... ({len(matches)} in all)" if len(matches) > 10 else "")
        raise UserError(f"{flag} {path}: the pattern matches " + (f"{len(matches)} paths, not one: {shown}"
                                                                  if matches else "nothing"))
    return Path(matches[0])


@dataclass
class Model:
    net: torch.nn.Module
    strategy: object
    mode: object
    cfg: object
    meta: dict
    path: Path
    sha256: str
    sampler: str
    steps: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape the network samples: the data's, or the autoencoder's latent grid."""
        return sample_shape(self.cfg, self.mode)


def load_model(path, flag: str, device, strategy: str | None, sampler: str | None, num_steps: int | None,
               compile_model: bool = False) -> Model:
    """A run folder (its best.pt, else its latest checkpoint), a checkpoint file or an exported folder, with EMA
    weights; a glob (runs/seg_*/best.pt) must match exactly one."""
    file, state = read_model(resolve_glob(path, flag), flag)
    if not isinstance(state, dict) or not {"config", "meta", "model"} <= set(state):
        raise UserError(f"{flag} {file}: not a training checkpoint of this framework")
    cfg, meta = stored_config(state["config"]), state["meta"]
    for name in meta.get("class_names") or []:      # they become folder names of generated images
        check_name(name, f"{flag} {file}: class_names")
    if strategy and strategy != meta["strategy"]:
        raise UserError(f"--strategy {strategy} contradicts {flag} {file}, which was trained with strategy "
                        f"{meta['strategy']!r} (leave --strategy out to use the checkpoint's)")
    if cfg.latent.autoencoder and meta.get("latent_scale") is None:
        raise UserError(f"{flag} {file}: a latent run without its latent scale (damaged checkpoint)")
    strat, mode = build_parts(cfg, meta["num_classes"], meta["image_channels"], device,
                              latent_scale=meta.get("latent_scale"))
    check_unchanged(mode, meta, f"{flag} {file}")
    check_frozen(meta, f"{flag} {file}")
    net = build_network(cfg, mode)
    weights = model_weights(state)
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise UserError(f"{flag} {file}: the weights hold NaN/inf values (a diverged run); sample from an "
                        "earlier checkpoint of that run")
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:      # a config that does not describe these weights (another preset, size, mode)
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UserError(f"{flag} {file}: the weights do not fit the network its config describes ({detail[:200]})"
                        ) from None
    net = BatchInvariant(net.to(device).eval())
    if compile_model:
        net = torch.compile(net)
    try:
        chosen = strat.check_sampler(sampler or cfg.strategy.sampler)
    except UserError as err:
        raise UserError(f"--sampler for {flag}: {err}") from None
    return Model(net, strat, mode, cfg, meta, file, sha256_of(file), chosen, num_steps or run_steps(cfg, strat, chosen))


def check_frozen(meta: dict, what: str) -> None:
    """A ControlNet run samples with the frozen run it was trained for: that run must still be there, with the
    weights it had (an exported ControlNet carries them and checks nothing)."""
    control = meta.get("control")
    if not control or control.get("embedded"):
        return
    path = Path(control["frozen_run"])
    if not path.is_file():
        raise UserError(f"{what}: its frozen run {path} is missing (a ControlNet samples with the run it was trained "
                        "for); restore it, or sample from an export of this run (medgen export)")
    found = sha256_of(path)
    if found != control["frozen_sha256"]:
        raise UserError(f"{what}: its frozen run {path} changed since the ControlNet was trained (SHA-256 "
                        f"{found[:12]}, recorded {control['frozen_sha256'][:12]}); retrain the ControlNet "
                        "for it, or restore the original checkpoint")


def run_steps(cfg, strat, sampler: str) -> int:
    """Steps when --num_steps is not given: the run's own strategy.sample_steps when sampling with the run's own
    sampler (what its validation grids used), else the sampler's default."""
    if cfg.strategy.sample_steps and sampler == strat.check_sampler(cfg.strategy.sampler):
        return cfg.strategy.sample_steps
    return strat.default_steps[sampler]
