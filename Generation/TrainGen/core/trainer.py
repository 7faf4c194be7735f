"""DiffusionTrainer: one training loop for every strategy x mode.

The step reads the same for all combinations: the mode splits the batch into (x0, conditioning), the
strategy draws times and corrupts, the network predicts, the loss is Min-SNR weighted per sample.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from ema_pytorch import EMA
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from medgen.Generation.TrainGen.core import latent
from medgen.Generation.TrainGen.core.checkpoint import load_checkpoint, model_weights, save_checkpoint
from medgen.Generation.TrainGen.core.config import stored_config, to_dict
from medgen.common.splits import units_record
from medgen.common.errors import UserError, lookup, grid_text
from medgen.common.features import load_radimagenet, perceptual_distance
from medgen.Generation.TrainGen.core.losses import min_snr_weight, per_sample_mse
from medgen.Generation.TrainGen.core.modes import MODES
from medgen.Generation.TrainGen.core.network import build_unet
from medgen.Generation.TrainGen.core.strategies import STRATEGIES
from medgen.Generation.TrainGen.core.validation import validation_scores, write_sample_grid

N_BINS = 10  # loss is also logged per tenth of the time range
RESUME_FIXED = ("model", "strategy", "mode", "latent")  # sections a resumed run must share with its checkpoint
PREEMPT_FILE = ".preempt"   # touched by the SLURM script's SIGUSR1 trap (or by hand): checkpoint and stop
REQUEUE_FILE = ".requeue"   # left by a preempted run: the job script requeues itself


def leave_requeue_mark(run_dir: Path) -> None:
    """After the checkpoint a preemption request asked for: the request is answered, the job script requeues."""
    (run_dir / PREEMPT_FILE).unlink(missing_ok=True)
    (run_dir / REQUEUE_FILE).touch()


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


def compile_enabled(cfg, device) -> bool:
    return cfg.runtime.compile if cfg.runtime.compile is not None else device.type == "cuda"


def uses_channels_last(cfg, device) -> bool:
    """channels_last on CUDA with torch.compile only: compiled kernels fuse the layout, while eager GroupNorm
    (every UNet block has one) has no fast NHWC kernel and converts back and forth (runtime.channels_last)."""
    return device.type == "cuda" and cfg.runtime.channels_last and compile_enabled(cfg, device)


def build_parts(cfg, num_classes: int | None, image_channels: int | None, device="cpu", data=None,
                latent_scale: float | None = None):
    """(strategy, mode) objects for a config; unknown names are user errors. With latent.autoencoder the mode
    works in that autoencoder's latent space (core/latent.py; its scale measured on `data` unless given)."""
    strategy = lookup(STRATEGIES, cfg.strategy.name, "--strategy")(cfg.strategy)
    mode = lookup(MODES, cfg.mode.name, "--mode")(cfg.mode, num_classes, image_channels)
    mode = latent.wrap(mode, cfg, device, data, latent_scale)
    if isinstance(mode, latent.LatentMode):
        strategy.clip_sample = False      # unit-variance latents are not bounded to [-1, 1] (run.preflight)
    strategy.bind_shape(latent.sample_shape(cfg, mode))
    return strategy, mode


def check_grid(cfg, shape: tuple[int, ...]) -> None:
    """Every UNet level halves the grid: each side must divide by 2^(levels - 1), else skip connections misalign."""
    from medgen.Generation.TrainGen.core.network import PRESETS
    levels = len(cfg.model.channels or PRESETS[cfg.model.preset][0])
    factor = 2 ** (levels - 1)
    if cfg.model.backend == "monai" and any(n % factor for n in shape):
        where = "latent grid" if cfg.latent.autoencoder else "data shape"
        raise UserError(f"the {where} {grid_text(shape)} does not divide by {factor}, which the "
                        f"{levels}-level UNet needs (data.image_size / data.volume_shape)")


@dataclass
class RunParts:
    """What a run is built from, built once and handed to the batch-size probe, the LR test and the trainer."""
    strategy: object
    mode: object
    net: torch.nn.Module
    meta: dict


def build_run_parts(cfg, train_data, device) -> RunParts:
    channels = train_data.images.shape[1] if train_data.images is not None else None
    meta = {"num_classes": len(train_data.class_names) or None, "image_channels": channels,
            "class_names": list(train_data.class_names)}
    if train_data.spacing is not None:   # the voxel grid generated volumes are written on
        meta["spacing"] = train_data.spacing.float().median(0).values.tolist()
    if cfg.optim.perceptual_weight > 0 and (cfg.data.spatial_dims != 2 or cfg.latent.autoencoder):
        raise UserError("optim.perceptual_weight (a 2D RadImageNet loss on the predicted image) needs 2D "
                        "pixel-space training; set it to 0 for volumes or latent runs")
    strategy, mode = build_parts(cfg, meta["num_classes"], channels, device, train_data)
    if isinstance(mode, latent.LatentMode):
        meta.update(latent_scale=mode.scale, autoencoder_sha256=mode.ae.sha256)
    strategy.check_sampler(cfg.strategy.sampler)  # a wrong sampler fails now, not at the first validation
    check_grid(cfg, latent.sample_shape(cfg, mode))
    net = build_unet(cfg.model, mode.in_channels, mode.out_channels, mode.class_embeds,
                     spatial_dims=cfg.data.spatial_dims).to(device)
    return RunParts(strategy, mode, net, meta)


def load_init_weights(net, mode, path, meta: dict) -> list[str]:
    """--init_from: weights (EMA when present) of another run, or a diffusers UNet2DModel folder (channels
    adapted, core/pretrained.py), loaded into net; returns one log line per adaptation. A class run's label
    embedding is mapped by class name onto this run's classes (a subset, or new classes, which start from the
    source's unconditional embedding); any other difference in architecture is refused."""
    from medgen.Generation.TrainGen.core import pretrained
    notes = []
    try:
        if pretrained.is_diffusers_folder(path):
            folder = pretrained.read_folder(path)
            state, notes = pretrained.adapt_state(pretrained.read_weights(folder), net.unet.state_dict(),
                                                  mode.out_channels)
            net.unet.load_state_dict(state)
        else:
            ckpt = load_checkpoint(path)
            state = model_weights(ckpt)
            notes = map_class_embedding(state, net.state_dict(), ckpt.get("meta", {}).get("class_names") or [],
                                        meta.get("class_names") or [])
            net.load_state_dict(state)
    except RuntimeError as err:
        first = [ln.strip() for ln in str(err).splitlines() if ln.strip()][1:2]
        raise UserError(f"--init_from {path}: incompatible architecture ({first[0] if first else err})") from None
    return notes + [f"initialised weights from {path}"]


def map_class_embedding(state: dict, target: dict, source_classes: list[str], classes: list[str]) -> list[str]:
    """Rewrite state's label-embedding rows (in place) for this run's classes, by name: a class the source knew
    keeps its row, a new class starts from the source's null (unconditional) row, the null row stays last."""
    keys = [k for k in target if k.endswith("class_embedding.weight") and k in state]
    if not keys or not source_classes or source_classes == classes:
        return []
    for k in keys:
        src = state[k]
        null = src[len(source_classes)]
        state[k] = torch.stack([src[source_classes.index(c)] if c in source_classes else null for c in classes]
                               + [null])
    kept = [c for c in classes if c in source_classes]
    new = [c for c in classes if c not in source_classes]
    dropped = [c for c in source_classes if c not in classes]
    return [f"class embedding mapped by name: kept {', '.join(kept) or 'none'}"
            + (f"; new {', '.join(new)}, starting from the unconditional embedding" if new else "")
            + (f"; dropped {', '.join(dropped)}" if dropped else "")]


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
        # gradient_as_bucket_view: gradients live in the all-reduce buckets (no second copy of every gradient);
        # static_graph: every step runs the same graph (fixed shapes, drop_last), so DDP can skip re-checking
        # which parameters were used and overlap the reduction of the last buckets better
        self.model = (DDP(self.net, device_ids=[dev.index] if dev.type == "cuda" else None,
                          gradient_as_bucket_view=True, static_graph=True) if rt.distributed else self.net)
        if compile_enabled(cfg, dev):
            # mode "default": fused kernels without CUDA graphs; "reduce-overhead" (CUDA graphs) would pin a
            # second copy of activations and recapture on every validation shape; dynamic=False because every
            # training batch has the same shape (batch_indices drops the tail).
            self.model = torch.compile(self.model, backend=cfg.runtime.compile_backend, dynamic=False,
                                       **({"mode": "default"} if cfg.runtime.compile_backend == "inductor" else {}))
        self.ema = (EMA(self.net, beta=cfg.ema.beta, update_after_step=cfg.ema.update_after_step,
                        update_every=cfg.ema.update_every, include_online_model=False, use_foreach=True)
                    if cfg.ema.enabled else None)
        # fused: one kernel for all parameters, and it can skip a non-finite step on the device (found_inf)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                     fused=True)
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
        self.min_snr = o.min_snr if o.min_snr is not None else self.strategy.min_snr_default
        self.perceptual = None
        if o.perceptual_weight > 0:
            self.perceptual = load_radimagenet(o.perceptual_weights, o.perceptual_sha256).to(dev)
        self.gen = torch.Generator(dev).manual_seed(cfg.runtime.seed * rt.world + rt.rank)
        self.step, self.epoch, self.batch_pos = 0, 0, 0
        self.skipped, self.streak, self.best, self.bad_vals = 0, 0, None, 0
        z = lambda: torch.zeros((), device=dev)  # noqa: E731
        self.health = {"skipped": z(), "streak": z(), "worst": z()}
        self.stop_requested = False
        self.saved_step = -1
        self._reset_stats()

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
        """(weighted mean loss, per-sample unweighted loss, times) for one batch."""
        gen = generator or self.gen
        x0, cond = self.mode.split(batch, train=train, generator=gen)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device) if noise is None else noise
        t = self.strategy.sample_times(len(x0), gen, x0.device) if t is None else t
        x_t, target = self.strategy.corrupt(x0, noise, t)
        with self.rt.autocast():
            pred = self.mode.forward(model or self.model, x_t, self.strategy.net_time(t), cond)
        per = per_sample_mse(pred, target)
        w = 1.0
        if self.min_snr:
            w = min_snr_weight(self.strategy.snr(t).to(per), self.cfg.optim.min_snr_gamma, self.strategy.prediction)
        loss = (w * per).mean()
        if self.perceptual is not None:
            x0_hat = self.strategy.predict_x0(pred.float(), x_t, t).clamp(-1, 1)
            with self.rt.autocast():
                percep = perceptual_distance(self.perceptual, (x0_hat + 1) / 2, (x0 + 1) / 2)
            loss = loss + self.cfg.optim.perceptual_weight * percep.float().mean()
        return loss, per.detach(), t

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
            self._record(per, t)
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
        ok = found_inf == 0
        self.health["skipped"] += found_inf
        self.health["streak"] = (self.health["streak"] + found_inf) * found_inf
        self.health["worst"] = torch.maximum(self.health["worst"], self.health["streak"])
        self.stats["loss"] += torch.where(ok, total, 0.0)
        self.stats["grad_norm"] += torch.where(ok, grad_norm.detach(), 0.0)
        self.stats["n"] += ok.float()
        self.opt.zero_grad(set_to_none=True)
        return found_inf

    def check_health(self) -> None:
        """Read the device-side guard (one sync, at log intervals): log skipped steps, stop after
        runtime.max_nonfinite consecutive ones."""
        skipped, worst, streak = (int(v) for v in torch.stack([self.health["skipped"], self.health["worst"],
                                                                self.health["streak"]]).tolist())
        if skipped > self.skipped:
            self.log_line(f"non-finite loss or gradient: {skipped - self.skipped} step(s) skipped up to optimizer "
                          f"step {self.step} (epoch {self.epoch}; {skipped} so far)")
        self.skipped = skipped
        if worst >= self.cfg.runtime.max_nonfinite:
            raise UserError(f"stopping: {worst} consecutive non-finite steps by optimizer step {self.step} "
                            f"(epoch {self.epoch}); lower optim.lr or check the data")
        self.health["worst"].copy_(self.health["streak"])
        self.streak = streak

    def preempted(self) -> bool:
        """True on every rank once any rank was asked to stop (SIGUSR1 or a <run>/.preempt file): one
        all-reduce, at log intervals and epoch ends only."""
        return self.rt.any_true(self.stop_requested or
                                (self.run_dir is not None and (self.run_dir / PREEMPT_FILE).exists()))

    # ------------------------------------------------------------------ stats and logging
    def _reset_stats(self):
        z = lambda: torch.zeros((), device=self.rt.device)  # noqa: E731
        self.stats = {"loss": z(), "grad_norm": z(), "n": z(), "t0": time.perf_counter(), "images": 0}
        self.bin_sum = torch.zeros(N_BINS, device=self.rt.device)
        self.bin_count = torch.zeros(N_BINS, device=self.rt.device)

    def _record(self, per: torch.Tensor, t: torch.Tensor):
        bins = (t.float() * N_BINS).long().clamp(0, N_BINS - 1)
        self.bin_sum.index_add_(0, bins, per.float())
        self.bin_count.index_add_(0, bins, torch.ones_like(per, dtype=torch.float32))
        self.stats["images"] += len(per) * self.rt.world

    def log_line(self, text: str):
        if self.logger is not None:
            self.logger.text(text)
        else:
            self.rt.print(text)

    def log_scalars(self):
        if self.stats["images"] == 0:  # no step since the last line (a run ending at a log interval)
            return
        if self.logger is None:
            self._reset_stats()
            return
        n = self.stats["n"].clamp(min=1)
        loss, grad_norm = (torch.stack([self.stats["loss"], self.stats["grad_norm"]]) / n).tolist()  # one read
        elapsed = time.perf_counter() - self.stats["t0"]
        scalars = {"train/loss": loss, "train/grad_norm": grad_norm,
                   "train/lr": self.sched.get_last_lr()[0], "train/images_per_s": self.stats["images"] / elapsed,
                   "train/skipped_steps": self.skipped}
        bins = (self.bin_sum / self.bin_count.clamp(min=1)).tolist()
        for i, v in enumerate(bins):
            if self.bin_count[i] > 0:
                scalars[f"loss_by_t/{i / N_BINS:.1f}-{(i + 1) / N_BINS:.1f}"] = v
        self.logger.scalars(scalars, self.step)
        self._reset_stats()

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
        self.best, self.bad_vals, self.skipped = state["best"], state["bad_vals"], state["skipped"]
        self.health["skipped"].fill_(self.skipped)
        rng = state["rng"]
        if len(rng) == self.rt.world:
            self.gen.set_state(rng[self.rt.rank])
        else:  # a different world size cannot continue the same noise streams; start fresh ones
            self.gen.manual_seed(self.cfg.runtime.seed * self.rt.world + self.rt.rank + 7919 * self.step)

    def resume(self, path) -> None:
        """Continue a run exactly: its model, EMA, optimizer, schedule, RNG streams and data position."""
        state = load_checkpoint(path, self.log_line)
        saved = to_dict(stored_config(state["config"]))  # a run started before a config key moved still resumes
        for section in RESUME_FIXED:
            if saved.get(section) != to_dict(self.cfg)[section]:
                raise UserError(f"--resume {path}: the checkpoint's {section} settings differ from this run's; "
                                f"resume with the same --{section if section != 'model' else 'config'}")
        self.load_state(state)
        if isinstance(self.mode, latent.LatentMode):   # the run's scale, as measured when it started
            latent.check_unchanged(self.mode, state["meta"], f"--resume {path}")
            self.mode.scale = self.meta["latent_scale"] = state["meta"]["latent_scale"]
        self.log_line(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    def sync_ema(self) -> None:
        """The EMA copy equal to the network (after weights were loaded into it)."""
        if self.ema is not None:
            self.ema.ema_model.load_state_dict(self.net.state_dict())
