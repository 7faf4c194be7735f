"""A training run: data, run folder, logging, validation with sample grids, resume, LR test, then fit()."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from medgen.config.paths import PathConfig
from medgen.Generation.TrainGen.core.checkpoint import checkpoint_file, list_checkpoints
from medgen.Generation.TrainGen.core.config import save_config
from medgen.common.dataset import print_problems
from medgen.Generation.TrainGen.core.datasource import data_source
from medgen.common.errors import UserError, grid_text, lookup, shape_text
from medgen.Generation.TrainGen.core.latent import in_latent, sample_shape
from medgen.common.fileio import remove_stale_tmp
from medgen.common.labels import check_not_binary, vocabulary
from medgen.common.locks import acquire, describe, holder, release
from medgen.Generation.TrainGen.core.modes import MODES
from medgen.Generation.TrainGen.core.pretrained import apply_to_config, is_diffusers_folder, read_folder
from medgen.Generation.TrainGen.core.strategies import STRATEGIES
from medgen.Generation.TrainGen.core.runtime import init_runtime, shutdown
from medgen.Generation.TrainGen.core.checkpoint import PREEMPT_FILE, REQUEUE_FILE
from medgen.Generation.TrainGen.core.exported import is_export
from medgen.Generation.TrainGen.core.parts import build_run_parts
from medgen.Generation.TrainGen.core.pretrained import load_init_weights
from medgen.Generation.TrainGen.core.trainer import DiffusionTrainer, check_resume
from medgen.common.outputs import claim


class RunLogger:
    """Rank 0 only: TensorBoard scalars and images, a plain-text train.log, console lines."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.log = open(run_dir / "train.log", "a", buffering=1)
        self.lock = None          # the run folder's lock (common/locks.py), released on close
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
        if self.lock is not None:
            release(self.lock)


def resolve_run_dir(cfg, rt) -> Path:
    paths = PathConfig.from_compute(cfg.paths.compute)
    if cfg.paths.run_dir:
        return Path(cfg.paths.run_dir)
    mode = cfg.mode.name + ("_ae" if cfg.runtime.stage == "autoencoder" else "")   # an autoencoder run says so

    def name(stamp: str) -> str:
        return cfg.paths.run_name.format(mode=mode, strategy=cfg.strategy.name, image_size=shape_text(cfg.data.shape, ""),
                                         epochs=cfg.optim.epochs, timestamp=stamp)
    if cfg.runtime.resume == "auto":
        runs = sorted(p for p in paths.output_root.glob(name("*")) if list_checkpoints(p))
        if runs:
            return runs[-1]
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if rt.distributed:
        import torch.distributed as dist
        dist.broadcast_object_list(stamp, src=0)  # every rank must write into the same folder
    return paths.output_root / name(stamp[0])


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


def preflight(cfg) -> None:
    """Errors in names, the sampler and the checkpoint paths, before any data is read or a run folder made."""
    lookup(MODES, cfg.mode.name, "--mode")
    lookup(STRATEGIES, cfg.strategy.name, "--strategy")(cfg.strategy).check_sampler(cfg.strategy.sampler)
    if cfg.latent.autoencoder and cfg.strategy.ddpm.clip_sample:
        raise UserError("strategy.ddpm.clip_sample true with --latent: latents are scaled to unit variance and a "
                        "third of them lie outside [-1, 1], so clipping the predicted x0 would distort every "
                        "sample; leave it unset (off in latent space)")
    if cfg.runtime.control_from and cfg.runtime.init_from:
        raise UserError("--control_from and --init_from: a ControlNet starts from its frozen run; give one of them")
    for flag, path in (("--resume", cfg.runtime.resume), ("--init_from", cfg.runtime.init_from),
                       ("--control_from", cfg.runtime.control_from)):
        if flag == "--init_from" and path and is_diffusers_folder(path):
            read_folder(path)                     # a diffusers model or pipeline folder: checked, read later
        elif flag in ("--init_from", "--control_from") and path and is_export(path):
            continue                              # an exported folder (medgen export): read with the weights
        elif path and path != "auto":
            try:
                checkpoint_file(Path(path), prefer_best=flag == "--control_from")  # the run generate.py samples
            except UserError as err:
                raise UserError(f"{flag}: {err}") from None


def load_data(cfg, rt):
    """(train split, val split or None), rank 0 building the cache first; on the GPU as data.cache_device says."""
    src = data_source(cfg)
    if src.demo:
        rt.print(f"no --data_dir: training on the built-in demo phantoms ({src.root}); pass --data_dir DIR "
                 "for your own data")
    if rt.distributed and not rt.is_main:
        torch.distributed.barrier()
    train_data = src.split(cfg.data, "train")
    try:
        val_data = src.split(cfg.data, "val")
    except UserError:
        val_data = None
    if rt.distributed and rt.is_main:
        torch.distributed.barrier()
    if rt.is_main:
        print_problems(train_data.problems)
    check_not_binary(train_data.masks, vocabulary(cfg.data), f"--data_dir {src.root}")
    if rt.device.type == "cuda" and cache_on_device(cfg.data.cache_device, rt.device, train_data, val_data):
        train_data = train_data.to(rt.device)
        val_data = val_data.to(rt.device) if val_data is not None else None
    return train_data, val_data


def cache_on_device(setting: str, device, *sets) -> bool:
    """data.cache_device: cuda always; auto when the sets take under a quarter of the GPU's free memory (a
    batch is then gathered on the device, with no host-to-device copy per step)."""
    if setting != "auto":
        return setting == "cuda"
    size = sum(t.numel() * t.element_size() for s in sets if s is not None
               for t in (s.images, s.masks, s.labels) if t is not None)
    return size < torch.cuda.mem_get_info(device)[0] / 4


def auto_batch_size(cfg, rt, parts):
    from medgen.Generation.TrainGen.core.autobatch import SAFETY, find_batch_size
    bs = find_batch_size(cfg, rt, parts)
    k = bs / cfg.optim.batch_size
    rt.print(f"--batch_size auto: {bs} per GPU (at most {SAFETY:.0%} of the largest that fits, and where throughput "
             f"stops growing); optim.lr {cfg.optim.lr:g} was set for batch {cfg.optim.batch_size}: for Adam the "
             f"usual rule is lr x sqrt({k:.3g}) = {cfg.optim.lr * k ** 0.5:.3g} (not applied)")
    return replace(cfg, optim=replace(cfg.optim, batch_size=bs, auto_batch_size=False))


def resume_path(cfg, run_dir: Path) -> Path | None:
    if cfg.runtime.resume == "auto":
        return run_dir if list_checkpoints(run_dir) else None  # a job that always passes it starts fresh once
    return Path(cfg.runtime.resume) if cfg.runtime.resume else None


def open_run_folder(cfg, rt, run_dir: Path, train_data, val_data) -> RunLogger | None:
    """Rank 0: the folder, locked for this job (a second training into it is refused while this one runs),
    stale temp files removed, its config.yaml, and the logger."""
    if not rt.is_main:
        return None
    claim(run_dir, "train", "--run_dir", run_inputs(cfg), own=("config.yaml", "ckpt_*.pt", "best.pt", ".*.tmp",
                                                             PREEMPT_FILE, REQUEUE_FILE))
    lock = acquire(run_dir, "--run_dir")
    if run_dir.is_dir():
        remove_stale_tmp(run_dir)  # left by a killed write; nothing else writes here now
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / REQUEUE_FILE).unlink(missing_ok=True)  # a fresh start clears a mark left for the job script
    logger = RunLogger(run_dir)
    logger.lock = lock
    unit = "volumes" if train_data.spatial_dims == 3 else "slices"
    logger.text(f"run folder {run_dir}; {len(train_data)} train / {len(val_data) if val_data else 0} val "
                f"{unit}; {rt.world} process(es) on {rt.device}")
    return logger


def run_inputs(cfg) -> dict:
    """{flag: path} of what a training run reads, which its run folder must keep apart from."""
    r = cfg.runtime
    return {"--data_dir": cfg.data.data_dir, "--control_from": r.control_from, "--init_from": r.init_from,
            "--latent": cfg.latent.autoencoder}


def with_control(cfg):
    """--control_from RUN: a ControlNet run takes the frozen run's network, strategy, mode and latent space, and its
    grid (size, crop, normalisation); the data and the label vocabulary of the masks are this run's."""
    if not cfg.runtime.control_from:
        return cfg
    from medgen.Generation.TrainGen.core.config import stored_config
    from medgen.Generation.TrainGen.core.exported import read_model
    given = cfg.runtime.control_from
    file, state = read_model(given, "--control_from")
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"--control_from {given}: not a training checkpoint of this framework")
    owner = holder(file.parent)
    if owner is not None:             # its checkpoints are still being written and pruned
        raise UserError(f"--control_from {given}: that run is still training ({describe(owner)}); a ControlNet "
                        "is bound to the frozen weights it starts from, so wait for the run to finish")
    frozen = stored_config(state["config"])
    if frozen.runtime.control_from:
        raise UserError(f"--control_from {given}: a ControlNet run itself; give the frozen run")
    if frozen.mode.name != "image":
        raise UserError(f"--control_from {given}: the frozen run generates mode {frozen.mode.name!r}; a ControlNet "
                        "adds mask control to an unconditional run (--mode image)")
    d = frozen.data
    data = replace(cfg.data, image_size=d.image_size, spatial_dims=d.spatial_dims, volume_shape=d.volume_shape,
                   crop_size=d.crop_size, norm_percentiles=d.norm_percentiles)
    taken = replace(cfg, data=data, model=frozen.model, strategy=frozen.strategy, mode=frozen.mode,
                    latent=frozen.latent)
    changed = [f"{name} {new!r} (this run's settings said {old!r})" for name, old, new in (
        ("mode", cfg.mode.name, frozen.mode.name), ("strategy", cfg.strategy.name, frozen.strategy.name),
        ("image_size", cfg.data.image_size, d.image_size), ("spatial_dims", cfg.data.spatial_dims, d.spatial_dims),
        ("volume_shape", cfg.data.volume_shape, d.volume_shape), ("crop_size", cfg.data.crop_size, d.crop_size),
        ("norm_percentiles", cfg.data.norm_percentiles, d.norm_percentiles),
        ("latent", cfg.latent.autoencoder, frozen.latent.autoencoder)) if old != new]
    changed += [f"{name} settings" for name, old, new in (
        ("model", cfg.model, frozen.model), ("strategy", cfg.strategy, frozen.strategy),
        ("latent", cfg.latent, frozen.latent)) if old != new and not any(c.startswith(name + " ") for c in changed)]
    if changed:
        print(f"note: --control_from: the ControlNet run takes the frozen run's {'; '.join(changed)}")
    return taken


def with_pretrained(cfg):
    """--init_from a diffusers folder: the run takes its architecture and DDPM schedule (core/pretrained.py)."""
    if not cfg.runtime.init_from or not is_diffusers_folder(cfg.runtime.init_from):
        return cfg
    cfg, notes = apply_to_config(cfg, read_folder(cfg.runtime.init_from))
    for note in notes:
        print(f"note: {note}")
    return cfg


def train_stage1(cfg) -> Path:
    """train.py --stage autoencoder: the first stage of latent diffusion (core/autoencoder.py); its run folder."""
    from medgen.Generation.TrainGen.core.autoencoder import train_autoencoder
    lookup(MODES, cfg.mode.name, "--mode")
    for flag, given in (("--latent", cfg.latent.autoencoder), ("--init_from", cfg.runtime.init_from),
                        ("--multi_gpu", cfg.runtime.multi_gpu)):
        if given:
            raise UserError(f"{flag} does not apply to --stage autoencoder (a single-process first stage)")
    rt = init_runtime(cfg.runtime)
    logger = None
    try:
        train_data, val_data = load_data(cfg, rt)
        run_dir = resolve_run_dir(cfg, rt)
        resume = resume_path(cfg, run_dir)
        logger = open_run_folder(cfg, rt, run_dir, train_data, val_data)
        train_autoencoder(cfg, rt, train_data, run_dir, logger, resume)
        return run_dir
    finally:
        if logger is not None:
            logger.close()
        shutdown(rt)


def train(cfg) -> int:
    """The train.py job (exit code 0: trained, or preempted with a checkpoint to resume from)."""
    run_training(cfg)
    return 0


def run_training(cfg) -> Path:
    """Train as the config says (either stage); returns the run folder."""
    if cfg.runtime.stage == "autoencoder":
        return train_stage1(cfg)
    preflight(cfg)
    cfg = with_control(with_pretrained(cfg))
    rt = init_runtime(cfg.runtime)
    tr = logger = None
    try:
        train_data, val_data = load_data(cfg, rt)
        parts = build_run_parts(cfg, train_data, rt.device)       # strategy, mode and network: built once
        if cfg.optim.auto_batch_size:
            cfg = auto_batch_size(cfg, rt, parts)
        run_dir = resolve_run_dir(cfg, rt)
        resume = resume_path(cfg, run_dir)
        init_notes = []
        if resume is None and cfg.runtime.init_from:   # weights accepted before the run folder is made
            init_notes = load_init_weights(parts.net, parts.mode, cfg.runtime.init_from, parts.meta)
        state = check_resume(cfg, parts.meta, parts.mode, resume) if resume is not None else None
        logger = open_run_folder(cfg, rt, run_dir, train_data, val_data)
        tr = DiffusionTrainer(cfg, rt, train_data, val_data, run_dir, logger, parts)
        if resume is not None:
            tr.resume(resume, state)
        elif init_notes:
            tr.sync_ema()
            for note in init_notes:
                tr.log_line(note)
        if cfg.optim.find_lr and resume is None:
            lr = tr.find_lr()
            if not cfg.optim.find_lr_then_train:
                return run_dir
            tr.set_lr(lr)
            if rt.is_main:
                save_config(tr.cfg, run_dir / "config.yaml")
        n_params = sum(p.numel() for p in tr.net.parameters())
        trained = sum(p.numel() for p in tr.net.parameters() if p.requires_grad)
        tr.log_line(f"{cfg.mode.name} x {cfg.strategy.name}: UNet {n_params / 1e6:.2f}M parameters"
                    + (f" ({trained / 1e6:.2f}M trained: a ControlNet beside the frozen run "
                       f"{cfg.runtime.control_from})" if trained < n_params else "")
                    + f", {tr.steps_per_epoch} steps/epoch, {tr.total_steps} steps in all")
        inner = in_latent(tr.mode)
        if inner is not None:
            tr.log_line(f"latent diffusion: in the latent space of {inner.ae.path} ({inner.ae.latent_channels} "
                        f"channels on a {grid_text(sample_shape(cfg, tr.mode))} grid, scale {inner.scale:.4g}); "
                        "samples are decoded by it")
        _stop_on_sigusr1(tr)
        tr.fit(validate=True)
        return run_dir
    finally:
        if logger is not None:
            logger.close()
        shutdown(rt)
