"""A training run: data, run folder, logging, validation with sample grids, resume, LR test, then fit()."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from config.paths import PathConfig
from Generation.TrainGen.core.checkpoint import checkpoint_file, list_checkpoints, load_checkpoint
from Generation.TrainGen.core.config import save_config, to_dict
from Generation.TrainGen.core.dataset import data_source, print_problems
from Generation.TrainGen.core.errors import UserError, lookup
from Generation.TrainGen.core.fileio import remove_stale_tmp
from Generation.TrainGen.core.modes import MODES
from Generation.TrainGen.core.data import MASK_ROLE
from Generation.TrainGen.core.strategies import STRATEGIES
from Generation.TrainGen.core.grid import save_grid
from Generation.TrainGen.core.runtime import init_runtime, shutdown
from Generation.TrainGen.core.sampling import sample
from Generation.TrainGen.core.segment_images import dice_iou
from Generation.TrainGen.core.trainer import REQUEUE_FILE, DiffusionTrainer

# sections a resumed run must share with its checkpoint
RESUME_FIXED = ("model", "strategy", "mode")


class RunLogger:
    """Rank 0 only: TensorBoard scalars and images, a plain-text train.log, console lines."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.log = open(run_dir / "train.log", "a", buffering=1)
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def text(self, line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        tqdm.write(line)
        self.log.write(stamped + "\n")

    def scalars(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        # training lines show the (Min-SNR weighted) loss as loss=, validation the unweighted one as val_loss=
        main = {k.split("/")[-1] if k.startswith("train/") else k.replace("/", "_"): v
                for k, v in values.items() if k.startswith(("train/", "val/"))}
        self.text(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in main.items()))

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.tb.close()
        self.log.close()


def resolve_run_dir(cfg, rt) -> Path:
    paths = PathConfig.from_compute(cfg.paths.compute)
    if cfg.paths.run_dir:
        return Path(cfg.paths.run_dir)
    name = lambda stamp: cfg.paths.run_name.format(mode=cfg.mode.name, strategy=cfg.strategy.name,  # noqa: E731
                                                   image_size=cfg.data.image_size, epochs=cfg.optim.epochs,
                                                   timestamp=stamp)
    if cfg.runtime.resume == "auto":
        runs = sorted(p for p in paths.output_root.glob(name("*")) if list_checkpoints(p))
        if runs:
            return runs[-1]
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if rt.distributed:
        import torch.distributed as dist
        dist.broadcast_object_list(stamp, src=0)  # every rank must write into the same folder
    return paths.output_root / name(stamp[0])


@torch.no_grad()
def validate(tr) -> bool:
    """Runs on every rank (no rank waits alone in a collective). Returns True when this is the best so far."""
    cfg, rt = tr.cfg, tr.rt
    data = tr.val_data if tr.val_data is not None and len(tr.val_data) > 0 else tr.train_data
    model = tr.sample_model()
    model.eval()
    gen = torch.Generator(rt.device).manual_seed(cfg.runtime.seed + 4242)
    bs = max(1, min(cfg.optim.batch_size, len(data) // rt.world))
    order = data.batch_indices(bs, 0, cfg.runtime.seed, rt.rank, rt.world)[:32]
    total = torch.zeros((), device=rt.device, dtype=torch.float64)
    for idx in order:
        _, per, _ = tr.loss(tr._to_device(data.batch(idx)), generator=gen, model=model, train=False)
        total += per.double().mean()
    val_loss = float(rt.mean(total / max(1, len(order))))
    n = min(cfg.runtime.num_val_samples, len(data))
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.runtime.seed))[:n]
    batch = tr._to_device(data.batch(pick))
    x0, cond = tr.mode.split(batch)
    outs = []
    metric, direction = tr.mode.validation
    for _ in range(max(1, cfg.mode.ensemble if metric == "dice" else 1)):
        noise = torch.randn(x0.shape, generator=gen, device=rt.device)
        x = sample(model, tr.strategy, tr.mode, cond, noise, cfg.strategy.sampler, cfg.strategy.sample_steps,
                   cfg.mode.guidance_scale, gen, rt.autocast)
        outs.append(x)
    x = torch.stack(outs).mean(0)
    outputs = tr.mode.outputs(x)
    scalars = {"val/loss": val_loss}
    if metric == "dice":
        dice, iou = dice_iou(outputs[MASK_ROLE], batch["masks"])
        scalars.update({"val/dice": dice, "val/iou": iou})
    score = scalars[f"val/{metric}"]
    better = (lambda new, old: new > old) if direction == "higher" else (lambda new, old: new < old)
    is_best = tr.best is None or better(score, tr.best)
    if is_best:
        tr.best, tr.bad_vals = score, 0
    else:
        tr.bad_vals += 1
    if rt.is_main and tr.logger is not None:
        tr.logger.scalars(scalars, tr.step)
        path = write_sample_grid(tr, outputs, batch, tr.run_dir / "samples" / f"epoch_{tr.epoch:04d}.png")
        tr.logger.image("samples", path, tr.step)
    tr.net.train()
    return is_best


def write_sample_grid(tr, outputs: dict, batch: dict, path: Path) -> Path:
    """Rows of samples: each generated output next to the real image or mask it should resemble."""
    real = tr.mode.outputs(tr.mode.split(batch)[0])
    # masks are outlined on images that were made from them (conditioning) or that they were made from
    outline = batch.get("masks") if MASK_ROLE in tr.mode.condition_roles or tr.mode.needs == "image" else None
    tiles, marks = [], []
    for i in range(len(next(iter(outputs.values())))):
        for role in outputs:
            for src in (outputs, real):
                tiles.append(src[role][i])
                marks.append(outline[i] if outline is not None and role != MASK_ROLE else torch.zeros_like(src[role][i][:1]))
    return save_grid(torch.stack(tiles), path, nrow=min(16, 2 * len(outputs) * 4), masks=torch.stack(marks), scale=2)


def _stop_on_sigusr1(tr) -> None:
    """SLURM sends SIGUSR1 shortly before the time limit (--signal): the trainer checkpoints at its next log
    interval and stops, leaving <run>/.requeue for the job script."""
    import signal

    def handler(signum, frame):
        tr.stop_requested = True
    try:
        signal.signal(signal.SIGUSR1, handler)
    except (ValueError, AttributeError):  # not the main thread, or no SIGUSR1 on this platform
        pass


def _check_resume(cfg, state, path) -> None:
    saved = state["config"]
    for section in RESUME_FIXED:
        if saved.get(section) != to_dict(cfg)[section]:
            raise UserError(f"--resume {path}: the checkpoint's {section} settings differ from this run's; "
                            f"resume with the same --{section if section != 'model' else 'config'}")


def preflight(cfg) -> None:
    """Errors in names, the sampler and the checkpoint paths, before any data is read or a run folder made."""
    lookup(MODES, cfg.mode.name, "--mode")
    lookup(STRATEGIES, cfg.strategy.name, "--strategy")(cfg.strategy).check_sampler(cfg.strategy.sampler)
    for flag, path in (("--resume", cfg.runtime.resume), ("--init_from", cfg.runtime.init_from)):
        if path and path != "auto":
            try:
                checkpoint_file(Path(path))
            except UserError as err:
                raise UserError(f"{flag}: {err}") from None


def train(cfg) -> int:
    preflight(cfg)
    rt = init_runtime(cfg.runtime)
    logger = None
    try:
        src = data_source(cfg)
        if src.demo:
            rt.print(f"no --data_dir: training on the built-in demo phantoms ({src.root}); pass --data_dir DIR "
                     "for your own data")
        if rt.distributed and not rt.is_main:
            torch.distributed.barrier()  # rank 0 builds the cache first
        train_data = src.split(cfg.data, "train")
        try:
            val_data = src.split(cfg.data, "val")
        except UserError:
            val_data = None
        if rt.distributed and rt.is_main:
            torch.distributed.barrier()
        if rt.is_main:
            print_problems(train_data.problems)
        if cfg.data.cache_device == "cuda" and rt.device.type == "cuda":
            train_data = train_data.to(rt.device)
            val_data = val_data.to(rt.device) if val_data is not None else None
        if cfg.optim.auto_batch_size:
            from Generation.TrainGen.core.autobatch import SAFETY, find_batch_size
            from Generation.TrainGen.core.trainer import build_parts
            channels = train_data.images.shape[1] if train_data.images is not None else None
            strategy, mode = build_parts(cfg, len(train_data.class_names) or None, channels)
            bs = find_batch_size(cfg, rt, mode, strategy)
            rt.print(f"--batch_size auto: {bs} per GPU ({SAFETY:.0%} of the largest that fits)")
            cfg = replace(cfg, optim=replace(cfg.optim, batch_size=bs, auto_batch_size=False))
        run_dir = resolve_run_dir(cfg, rt)
        resume_path = None
        if cfg.runtime.resume:
            resume_path = run_dir if cfg.runtime.resume == "auto" else Path(cfg.runtime.resume)
            if cfg.runtime.resume == "auto" and not list_checkpoints(run_dir):
                resume_path = None  # first start of a job that always passes --resume auto
        if rt.is_main:
            if run_dir.is_dir():
                remove_stale_tmp(run_dir)  # left by a killed write; nothing else writes here now
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            logger = RunLogger(run_dir)
            logger.text(f"run folder {run_dir}; {len(train_data)} train / {len(val_data) if val_data else 0} val "
                        f"slices; {rt.world} process(es) on {rt.device}")
        tr = DiffusionTrainer(cfg, rt, train_data, val_data, run_dir, logger)
        if resume_path is not None:
            state = load_checkpoint(resume_path, tr.log_line)
            _check_resume(cfg, state, resume_path)
            tr.load_state(state)
            tr.log_line(f"resumed from {resume_path} at step {tr.step} (epoch {tr.epoch})")
        elif cfg.runtime.init_from:
            tr.init_weights(cfg.runtime.init_from)
            tr.log_line(f"initialised weights from {cfg.runtime.init_from}")
        if cfg.optim.find_lr and resume_path is None:
            from Generation.TrainGen.core.lr_finder import find_lr
            lr = find_lr(tr, run_dir)
            tr.log_line(f"LR range test: suggested lr {lr:.3g} (curve in {run_dir / 'lr_finder.png'})")
            if not cfg.optim.find_lr_then_train:
                return 0
            cfg = replace(cfg, optim=replace(cfg.optim, lr=lr, find_lr=False))
            if rt.is_main:
                save_config(cfg, run_dir / "config.yaml")
            tr = DiffusionTrainer(cfg, rt, train_data, val_data, run_dir, logger)
        n_params = sum(p.numel() for p in tr.net.parameters())
        tr.log_line(f"{cfg.mode.name} x {cfg.strategy.name}: UNet {n_params / 1e6:.2f}M parameters, "
                    f"{tr.steps_per_epoch} steps/epoch")
        _stop_on_sigusr1(tr)
        if rt.is_main and run_dir is not None:
            (run_dir / REQUEUE_FILE).unlink(missing_ok=True)  # a fresh start clears a mark left for the job script
        tr.fit(validate)
        return 0
    finally:
        if logger is not None:
            logger.close()
        shutdown(rt)
