"""DiffusionTrainer: one training loop for every strategy x mode.

The step reads the same for all combinations: the mode splits the batch into (x0, conditioning), the
strategy draws times and corrupts, the network predicts, the loss is Min-SNR weighted per sample.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from ema_pytorch import EMA
from tqdm import tqdm

from medgen.common.errors import UserError
from medgen.common.features import load_radimagenet
from medgen.common.labels import BINARY, from_record
from medgen.common.splits import units_record
from medgen.Generation.TrainGen.core import latent
from medgen.Generation.TrainGen.core.checkpoint import (PREEMPT_FILE, leave_requeue_mark, load_checkpoint,
                                                        save_checkpoint)
from medgen.Generation.TrainGen.core.config import stored_config, to_dict
from medgen.Generation.TrainGen.core.losses import DiffusionLoss
from medgen.Generation.TrainGen.core.parts import RunParts, build_run_parts, training_model, uses_channels_last
from medgen.Generation.TrainGen.core.train_stats import StepStats
from medgen.Generation.TrainGen.core.validation import validation_scores, write_sample_grid

RESUME_FIXED = ("model", "strategy", "mode", "latent")  # sections a resumed run must share with its checkpoint


def all_finite(tensors) -> bool:
    """Whether every value of every tensor is finite, read back from the device once (not once per tensor)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


class DiffusionTrainer:
    def __init__(self, cfg, rt, train_data, val_data=None, run_dir: Path | None = None, logger=None,
                 parts: RunParts | None = None):
        self.cfg, self.rt, self.train_data, self.val_data = cfg, rt, train_data, val_data
        self.run_dir, self.logger = run_dir, logger
        parts = parts or build_run_parts(cfg, train_data, rt.device)
        self.strategy, self.mode, self.net, self.meta = parts.strategy, parts.mode, parts.net, parts.meta
        # which units trained it, hashed: evaluations refuse test data the generator saw (common/splits.py)
        self.meta["data_units"] = units_record(cfg.data, train_data.sources, val_data.sources if val_data else [])
        dev = rt.device
        self.channels_last = uses_channels_last(cfg, dev)
        self.memory_format = torch.channels_last if cfg.data.spatial_dims == 2 else torch.channels_last_3d
        if self.channels_last:
            self.net = self.net.to(memory_format=self.memory_format)
        self.model = training_model(self.net, cfg, rt)   # DDP and torch.compile around the network
        self.ema = (EMA(self.net, beta=cfg.ema.beta, update_after_step=cfg.ema.update_after_step,
                        update_every=cfg.ema.update_every, include_online_model=False, use_foreach=True)
                    if cfg.ema.enabled else None)
        # fused: one kernel for all parameters, and it can skip a non-finite step on the device (found_inf)
        # a ControlNet run trains the ControlNet alone: the frozen network's parameters do not require grad
        self.opt = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                     weight_decay=cfg.optim.weight_decay, fused=True)
        o = cfg.optim
        self.batches_per_epoch = len(train_data.batch_indices(o.batch_size, 0, cfg.runtime.seed, rt.rank, rt.world))
        self.steps_per_epoch = self.batches_per_epoch // o.grad_accum
        if self.steps_per_epoch == 0:
            unit = "volume(s)" if train_data.spatial_dims == 3 else "slice(s)" if train_data.masks is not None \
                else "image(s)"
            raise UserError(f"the training split has {len(train_data)} {unit}: too few for batch_size "
                            f"{o.batch_size} x grad_accum {o.grad_accum} x {rt.world} process(es)")
        # the schedule's horizon: the run's last step (max_steps when it bounds the run, so a run bounded by steps
        # decays to 0 at its end); the warm-up takes at most a fifth of it
        self.total_steps = min(self.steps_per_epoch * o.epochs, o.max_steps or math.inf)
        warmup = min(o.warmup_epochs * self.steps_per_epoch, max(1, self.total_steps // 5))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(warmup, self.total_steps))
        min_snr = o.min_snr if o.min_snr is not None else self.strategy.min_snr_default
        perceptual = load_radimagenet(o.perceptual_weights, o.perceptual_sha256).to(dev) if o.perceptual_weight > 0 \
            else None
        self.objective = DiffusionLoss(self.strategy, self.mode, rt.autocast, min_snr, o.min_snr_gamma, perceptual,
                                       o.perceptual_weight, o.region_contrast_weight, o.region_contrast_margin)
        self.gen = torch.Generator(dev).manual_seed(cfg.runtime.seed * rt.world + rt.rank)
        self.step, self.epoch, self.batch_pos = 0, 0, 0
        self.best, self.bad_vals = None, 0
        self.stats = StepStats(dev, rt.world)
        self.stop_requested = False
        self.saved_step = -1

    # ------------------------------------------------------------------ the step
    def sample_model(self):
        return self.ema.ema_model if self.ema is not None else self.net

    def to_device(self, batch: dict) -> dict:
        out = {k: v.to(self.rt.device, non_blocking=True) for k, v in batch.items()}
        if self.channels_last:
            out = {k: v.contiguous(memory_format=self.memory_format) if v.dim() == 2 + self.cfg.data.spatial_dims
                   else v for k, v in out.items()}
        return out

    def flipped(self, batch: dict) -> dict:
        """data.random_flip: each sample mirrored left-right (the last axis) with probability 1/2, images and
        masks together, drawn from the run's generator (so resume stays exact)."""
        flip = self.cfg.data.random_flip
        if not (flip if flip is not None else self.cfg.data.spatial_dims == 3):
            return batch
        ref = next(v for k, v in batch.items() if k in ("images", "masks"))
        pick = torch.rand(len(ref), generator=self.gen, device=ref.device) < 0.5
        return {k: torch.where(pick.view(-1, *[1] * (v.dim() - 1)), v.flip(-1), v) if k in ("images", "masks") else v
                for k, v in batch.items()}

    def loss(self, batch: dict, noise=None, t=None, generator=None, model=None, train=True):
        """(weighted mean loss, per-sample unweighted loss, times) for one batch (core/losses.py)."""
        return self.objective(model or self.model, batch, generator or self.gen, noise, t, train)

    @property
    def min_snr(self) -> bool:
        return self.objective.min_snr

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the device flag 1.0 when it was skipped as
        non-finite (read it only when needed: reading syncs)."""
        self.model.train()
        total = torch.zeros((), device=self.rt.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            ctx = self.model.no_sync() if self.rt.distributed and not last and hasattr(self.model, "no_sync") \
                else contextlib.nullcontext()
            with ctx:
                loss, per, t = self.loss(self.flipped(self.to_device(batch)))
                (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
            self.stats.record(per, t)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        # The non-finite guard stays on the device: no host sync in the step. Every rank must skip together or
        # DDP replicas drift apart (one all-reduce); fused AdamW skips the update itself when found_inf is set.
        finite = torch.isfinite(total) & torch.isfinite(grad_norm)
        found_inf = (~finite).float()
        if self.rt.distributed:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        self.opt.found_inf = found_inf
        self.opt.step()
        del self.opt.found_inf
        self.sched.step()
        if self.ema is not None:
            self.ema.update()  # after a skipped step the weights are unchanged, so this is harmless
        self.step += 1
        self.stats.step(total, grad_norm, found_inf)
        self.opt.zero_grad(set_to_none=True)
        return found_inf

    def check_health(self) -> None:
        """Read the device-side guard (one sync, at log intervals): log skipped steps, stop after
        runtime.max_nonfinite consecutive ones."""
        self.stats.check_health(self.cfg.runtime.max_nonfinite, f"optimizer step {self.step} (epoch {self.epoch})",
                                self.log_line)

    @property
    def skipped(self) -> int:
        return self.stats.skipped

    @property
    def streak(self) -> int:
        return self.stats.streak

    def preempted(self) -> bool:
        """True on every rank once any rank was asked to stop (SIGUSR1 or a <run>/.preempt file): one
        all-reduce, at log intervals and epoch ends only."""
        return self.rt.any_true(self.stop_requested or
                                (self.run_dir is not None and (self.run_dir / PREEMPT_FILE).exists()))

    # ------------------------------------------------------------------ logging
    def log_line(self, text: str):
        if self.logger is not None:
            self.logger.text(text)
        else:
            self.rt.print(text)

    def log_scalars(self):
        scalars = self.stats.scalars(self.sched.get_last_lr()[0])
        if scalars is not None and self.logger is not None:
            self.logger.scalars(scalars, self.step)

    # ------------------------------------------------------------------ loop
    def fit(self, validate: bool = False) -> str:
        """Train until cfg.optim.epochs or cfg.optim.max_steps ('done') or a preemption request ('preempted');
        with validate, self.validate() runs every runtime.val_interval epochs, on every rank."""
        cfg, o = self.cfg, self.cfg.optim
        max_steps = o.max_steps if o.max_steps is not None else math.inf
        accum = o.grad_accum
        # one bar for the whole run (its ETA is the run's), labelled with the epoch
        bar = tqdm(total=self.total_steps, initial=self.step, leave=False, unit="step", disable=not self.rt.is_main)
        validated = -1
        while self.epoch < o.epochs and self.step < max_steps:
            order = self.train_data.batch_indices(o.batch_size, self.epoch, cfg.runtime.seed, self.rt.rank, self.rt.world)
            order = order.to(self.train_data.device)  # a GPU-resident cache then gathers batches without host work
            n_use = self.steps_per_epoch * accum
            bar.set_description(f"epoch {self.epoch + 1}/{o.epochs}")
            while self.batch_pos < n_use and self.step < max_steps:
                micro = [self.train_data.batch(order[self.batch_pos + i]) for i in range(accum)]
                self.train_step(micro)
                self.batch_pos += accum
                bar.update(1)
                if self.step % cfg.runtime.log_interval == 0:
                    self.check_health()
                    self.log_scalars()
                    if self.preempted():
                        bar.close()
                        return self.stop_for_requeue()
            self.check_health()
            if self.batch_pos < n_use:
                break  # max_steps reached mid-epoch: the position is saved below
            self.epoch, self.batch_pos = self.epoch + 1, 0
            is_best = False
            if validate and (self.epoch % cfg.runtime.val_interval == 0 or self.epoch == o.epochs):
                is_best, validated = self.validate(), self.step
            if self.epoch % cfg.runtime.checkpoint_every == 0 or self.epoch == o.epochs or is_best:
                self.checkpoint(is_best)
            if self.stop_early():
                self.log_line(f"early stop after epoch {self.epoch}: no validation improvement in "
                              f"{self.bad_vals} validations")
                break
            if self.preempted():
                bar.close()
                return self.stop_for_requeue()
        bar.close()
        self.log_scalars()
        # every run ends with something to look at: a last validation, its sample grid and best.pt, even when
        # max_steps ended it before the first validation interval
        is_best = validate and validated != self.step and self.val_data is not None and self.validate()
        self.checkpoint(bool(is_best))
        return "done"

    def stop_for_requeue(self) -> str:
        """Preemption: checkpoint now (every rank takes part), leave <run>/.requeue for the job script."""
        self.checkpoint(False)
        if self.rt.is_main and self.run_dir is not None:
            leave_requeue_mark(self.run_dir)
            self.log_line(f"preempted at optimizer step {self.step} (epoch {self.epoch}): checkpoint saved; "
                          f"the job script requeues and resumes with --resume auto")
        return "preempted"

    def stop_early(self) -> bool:
        patience = self.cfg.runtime.early_stop_patience
        return patience is not None and self.bad_vals >= patience

    # ------------------------------------------------------------------ validation, LR test
    def validate(self) -> bool:
        """Validation scores, logged with a sample grid; True when the mode's score is the best so far."""
        scalars, outputs, batch = validation_scores(self)
        metric, direction = self.mode.validation
        score = scalars[f"val/{metric}"]
        is_best = self.best is None or (score > self.best if direction == "higher" else score < self.best)
        self.best, self.bad_vals = (score, 0) if is_best else (self.best, self.bad_vals + 1)
        if self.rt.is_main and self.logger is not None:
            self.logger.scalars(scalars, self.step)
            path = write_sample_grid(self.mode, outputs, batch, self.run_dir / "samples" / f"epoch_{self.epoch:04d}.png")
            self.logger.image("samples", path, self.step)
        return is_best

    def find_lr(self) -> float:
        """The LR range test (core/lr_finder.py) on this run's network; weights and optimizer are restored."""
        from medgen.Generation.TrainGen.core.lr_finder import find_lr
        lr = find_lr(self, self.run_dir, steps=self.cfg.optim.find_lr_steps)
        self.log_line(f"LR range test: suggested lr {lr:.3g} (curve in {self.run_dir / 'lr_finder.png'})")
        return lr

    def set_lr(self, lr: float) -> None:
        """Train with this peak LR from now on (after the LR test): the warm-up/cosine schedule scales it."""
        self.cfg = replace(self.cfg, optim=replace(self.cfg.optim, lr=lr, find_lr=False))
        self.sched.base_lrs = [lr for _ in self.opt.param_groups]
        for group in self.opt.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * self.sched.lr_lambdas[0](self.sched.last_epoch)

    # ------------------------------------------------------------------ checkpoints
    def gather_rng(self) -> list[torch.Tensor]:
        state = self.gen.get_state()
        if not self.rt.distributed:
            return [state]
        out = [None] * self.rt.world
        dist.all_gather_object(out, state)
        return out

    def state_dict(self, rng: list | None = None) -> dict:
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "step": self.step,
                "epoch": self.epoch, "batch_pos": self.batch_pos, "rng": rng or [self.gen.get_state()],
                "best": self.best, "bad_vals": self.bad_vals, "skipped": self.skipped,
                "config": to_dict(self.cfg), "meta": {**self.meta, "strategy": self.strategy.name,
                                                      "mode": self.mode.name, "prediction": self.strategy.prediction}}

    def checkpoint(self, is_best: bool) -> None:
        """Called on every rank (the RNG gather is a collective); rank 0 writes."""
        if self.run_dir is None or (self.step == self.saved_step and not is_best):
            return
        if not all_finite(self.net.parameters()):  # one device-to-host read per checkpoint
            raise UserError(f"stopping: the weights became NaN/inf by optimizer step {self.step} (epoch {self.epoch}); "
                            "no checkpoint is written, the saved ones are intact; lower optim.lr")
        self.saved_step = self.step
        rng = self.gather_rng()
        if self.rt.is_main:
            path = save_checkpoint(self.state_dict(rng), self.run_dir, self.step, self.cfg.runtime.keep_last, is_best)
            self.log_line(f"saved {path.name}" + (" (best)" if is_best else ""))

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step, self.epoch, self.batch_pos = state["step"], state["epoch"], state["batch_pos"]
        self.best, self.bad_vals = state["best"], state["bad_vals"]
        self.stats.restore(state["skipped"])
        rng = state["rng"]
        if len(rng) == self.rt.world:
            self.gen.set_state(rng[self.rt.rank])
        else:  # a different world size cannot continue the same noise streams; start fresh ones
            self.gen.manual_seed(self.cfg.runtime.seed * self.rt.world + self.rt.rank + 7919 * self.step)

    def resume(self, path, state: dict | None = None) -> None:
        """Continue a run exactly: its model, EMA, optimizer, schedule, RNG streams and data position. `state`:
        the checkpoint check_resume already read and accepted."""
        if state is None:
            state = check_resume(self.cfg, self.meta, self.mode, path, self.log_line)
        self.load_state(state)
        inner = latent.in_latent(self.mode)
        if inner is not None:                          # the run's scale, as measured when it started
            inner.scale = self.meta["latent_scale"] = state["meta"]["latent_scale"]
        self.log_line(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    def sync_ema(self) -> None:
        """The EMA copy equal to the network (after weights were loaded into it)."""
        if self.ema is not None:
            self.ema.ema_model.load_state_dict(self.net.state_dict())


def check_resume(cfg, meta: dict, mode, path, say=print) -> dict:
    """The checkpoint to resume from, read and checked against this run's settings (before the run folder is
    touched, so that a refused resume changes nothing in it)."""
    state = load_checkpoint(path, say)
    saved = to_dict(stored_config(state["config"]))  # a run started before a config key moved still resumes
    for section in RESUME_FIXED:
        if saved.get(section) != to_dict(cfg)[section]:
            raise UserError(f"--resume {path}: the checkpoint's {section} settings differ from this run's; "
                            f"resume with the same --{section if section != 'model' else 'config'}")
    old, new = state["meta"].get("control") or {}, meta.get("control") or {}
    if old.get("frozen_sha256") != new.get("frozen_sha256"):
        same = old.get("frozen_run") == new.get("frozen_run")
        raise UserError(f"--resume {path}: the checkpoint's ControlNet was trained for "
                        + (f"the frozen run {old.get('frozen_run')} as it was then; its weights have changed since"
                           if same else f"another frozen run ({old.get('frozen_run', 'none')}) than this run's "
                           f"--control_from ({new.get('frozen_run', 'none')})"))
    if state["meta"].get("labels", BINARY.record()) != meta["labels"]:
        raise UserError(f"--resume {path}: the checkpoint was trained with the label vocabulary "
                        f"{from_record(state['meta'].get('labels')).describe()}, this run has "
                        f"{from_record(meta['labels']).describe()} (data.labels)")
    inner = latent.in_latent(mode)
    if inner is not None:
        latent.check_unchanged(inner, state["meta"], f"--resume {path}")
    return state
