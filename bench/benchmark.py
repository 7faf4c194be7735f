"""The project's benchmark: prints a table and writes JSON.

    python bench/benchmark.py --device cpu --preset tiny [--suite data] [--json out.json]

Suites
  data   slice-cache build rate (slices/s, reading + checking + preprocessing NIfTI) and the batch rate
         served from the in-memory cache (batches/s), on the embedded demo dataset.
  sampling  images/s of generate.py's sampling path (per-sample generators, batch-invariant UNet, bf16 on
         CUDA) for DDPM-1000 (ancestral), DDIM-50 and RFlow Euler-30 on the same bravo UNet (random weights:
         the cost does not depend on them); and generation with its output written against sampling alone.
  training  bravo-mode training throughput, same UNet, data and batch, side by side in one process, alternated:
         baseline = a faithful copy of MONAI's 2d_ddpm tutorial loop (CacheDataset + DataLoader workers,
         DiffusionInferer + DDPMScheduler, Adam, fp16 autocast + GradScaler on CUDA, attention without SDPA);
         ours = DiffusionTrainer's default path (slice cache, SDPA, fused AdamW, device-side NaN guard; on CUDA
         also bf16, channels_last, TF32, torch.compile). Two ratios: step only (the same batch already on the
         device) and end to end (each side's data path). Also MFU = 3 x forward FLOPs (torch.utils.flop_counter)
         x steps/s over the GPU's dense bf16 peak (by exact device name), and the data path's batch rate.
  metrics  images/s (or pairs/s) of each evaluation metric: Inception and RadImageNet feature extraction,
         LPIPS, MS-SSIM, MAE+PSNR, on random images (random weights: same cost as the published ones).
  minsnr   sample quality of rectified flow trained with and without Min-SNR weighting, side by side: the same
         bravo model, data, seeds and steps, twice; then Euler-30 samples conditioned on the real validation
         masks, scored against the real slices they were conditioned on (MAE, PSNR, MS-SSIM) and by the
         distance between the brain-intensity histograms (Wasserstein-1), per training seed and on average.
         Not part of the default run (it trains models): ask for it with --suite minsnr.
  nfe      quality vs network evaluations and wall time, side by side in one run: one bravo model per strategy,
         then DDPM ancestral-1000, DDIM and DPM-Solver++(2M), RFlow Euler and Heun at several step counts, on
         the same real validation masks and seeds; quality = Fréchet distance in a downstream segmenter's
         feature space (trained on the real slices, offline) and the brain-intensity Wasserstein-1 distance.
         Prints the table and plots it (--plot). Ask for it with --suite nfe.
  gpu      what only a GPU shows (bench/gpu_check.sh): training with compile off/on for ddpm and rflow with the
         first step's time, DDIM-50 sampling against diffusers' DDIMScheduler on the same network, and the
         batch-invariance difference on the device. Ask for it with --suite gpu.
  regions  per-region faithfulness (WT, TC, ET) and the ET / ED enhancement of dual models conditioned on binary
         masks, on BraTS label maps, and on label maps with the region-specific contrastive loss, side by side on
         the phantoms (bench_regions). Ask for it with --suite regions.
  control  mask control for a frozen generator: a ControlNet over a frozen unconditional bravo model against a
         concatenation-conditioned model trained for the same steps (faithfulness, MAE, PSNR, intensity W1), and
         the frozen model itself. Ask for it with --suite control.
  inpaint  lesions inserted into real scans by a trained inpaint model and by RePaint with a bravo model: identity
         outside the region, the seam, FLAIR contrast inside the lesion, faithfulness. Ask for it with --suite inpaint.
  volumes  bravo training on whole volumes (rflow step, random data: the cost does not depend on it): volumes/s
         and memory for pixel space, pixel space with gradient checkpointing, and latent space (AutoencoderKL,
         4x smaller per axis, encoded on the fly; the latent grid must still divide by 4 for the UNet). Memory is the CUDA peak on a GPU and, on CPU, the bytes
         autograd saves for the backward pass. On CUDA also the largest volume that trains at batch 1, with
         and without latents. 32x32x16 on CPU (tiny), 64x64x48 (tiny) or 128x128x96 (research) on a GPU.
  copies   what the memorization audit's copy distance flags: transformed copies of training slices (moves of
         3-5 px in random directions, flips, crops of 80-90% at random offsets resized back, a zoom-out,
         rotations, intensity, noise, blur) and fresh phantoms of other subjects, each against the held-out
         thresholds of audit.memorization, and the seconds per query. Ask for it with --suite copies.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from medgen.Generation.TrainGen.core.config import build_config  # noqa: E402
from medgen.common.dataset import load_split  # noqa: E402
from medgen.Generation.TrainGen.core.phantom import ensure_demo_data  # noqa: E402

PRESETS = {  # subjects, volume shape, image size, batch size
    "ci": (6, (32, 32, 16), 32, 4),          # the test suite's run: every row, at the smallest sizes
    "tiny": (16, (64, 64, 48), 32, 16),
    "research": (40, (128, 128, 64), 128, 16),
}
MODEL_PRESETS = {"ci": ("tiny", 4), "tiny": ("tiny", 16), "research": ("base128", 256)}  # UNet preset, sampling batch


def bench_data(device: str, preset: str, work: Path) -> list[dict]:
    n_subjects, shape, size, batch = PRESETS[preset]
    root = ensure_demo_data(work / "demo", n_subjects, shape) / "brain"
    cfg = build_config({"data": {"image_size": size}})
    roles = ["bravo", "seg"]
    t0 = time.perf_counter()
    data = load_split(cfg.data, root, "train", roles, work / "cache")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = load_split(cfg.data, root, "train", roles, work / "cache")
    load_s = time.perf_counter() - t0
    data = data.to(device)
    n_batches = 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < (0.3 if preset == "ci" else 2.0):
        for idx in data.batch_indices(batch, epoch=n_batches, seed=0):
            b = data.batch(idx.to(device))
            n_batches += 1
        sync()
    rate = n_batches / (time.perf_counter() - t0)
    del b
    return [
        {"suite": "data", "metric": "cache build", "value": len(data) / build_s, "unit": "slices/s",
         "note": f"{n_subjects} subjects {shape}, bravo+seg -> {size}px"},
        {"suite": "data", "metric": "cache load", "value": load_s, "unit": "s", "note": f"{len(data)} slices"},
        {"suite": "data", "metric": "batches from cache", "value": rate, "unit": "batches/s",
         "note": f"batch {batch}, on {device}"},
    ]


def bench_sampling(device: str, preset: str, work: Path) -> list[dict]:
    from medgen.Generation.TrainGen.core.generate import Job, draw
    from medgen.Generation.TrainGen.core.generation.models import BatchInvariant, Model
    from medgen.Generation.TrainGen.core.network import build_unet
    from medgen.Generation.TrainGen.core.parts import build_parts
    unet, batch = MODEL_PRESETS[preset]
    size = PRESETS[preset][2]
    dev = torch.device(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else None
    job = Job(mode="bravo", output_dir=work, num_images=batch, batch_size=batch, device=dev, autocast=autocast)
    mask = (torch.rand(batch, 1, size, size, device=dev) > 0.9).float()
    rows = []
    # the test suite's run (ci) keeps every row, with fewer steps
    ancestral, ddim, euler = (8, 4, 4) if preset == "ci" else (1000, 50, 30)
    for strategy, sampler, steps in (("ddpm", "ddpm", ancestral), ("ddpm", "ddim", ddim), ("rflow", "euler", euler)):
        cfg = build_config({"model": {"preset": unet}, "data": {"image_size": size},
                            "strategy": {"name": strategy}, "mode": {"name": "bravo"}})
        strat, mode = build_parts(cfg, None, None)
        net = BatchInvariant(build_unet(cfg.model, mode.in_channels, mode.out_channels).to(dev).eval())
        model = Model(net, strat, mode, cfg, {}, Path("-"), "", sampler, steps)
        seeds = list(range(batch))
        draw(job, replace(model, steps=2), seeds[:2], {"concat": mask[:2] * 2 - 1})  # warm-up
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        draw(job, model, seeds, {"concat": mask * 2 - 1})
        sync()
        rate = batch / (time.perf_counter() - t0)
        rows.append({"suite": "sampling", "metric": f"{strategy} {sampler}-{steps}", "value": rate,
                     "unit": "images/s", "note": f"{unet} UNet, {size}px bravo, batch {batch}, on {device}"})
    return rows + bench_writing(model, mask, batch, dev, autocast, work, *((1, 1) if preset == "ci" else (3, 3)))


def bench_writing(model, mask, batch: int, dev, autocast, work: Path, n_batches: int = 3, rounds: int = 3
                  ) -> list[dict]:
    """generate.py's loop with its output written (NIfTI image + mask and the commit row per sample, encoded
    and written on the writer threads while the next batch samples) against the same loop sampling only."""
    from medgen.Generation.TrainGen.core.generate import Job, generate_batch, run_job
    n = n_batches * batch
    sources = [f"bench_subject_{i}#slice0" for i in range(n)]

    def job(out):
        return Job(mode="bravo", output_dir=out, num_images=n, batch_size=batch, image_model=model, device=dev,
                   autocast=autocast, real_conditions=mask.cpu(), real_sources=sources, masks_from="bench")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    generate_batch(job(work / "warm"), [0])

    def sampling_only(k):
        j = job(work / f"alone{k}")
        for start in range(0, n, batch):
            generate_batch(j, list(range(start, start + batch)))
        sync()

    def with_writing(k):
        return run_job(job(work / f"written{k}"))["seconds"]   # the loop, writer drained; not the final manifest
    # alternated, median of three each: a 2-core machine drifts by more than the difference being measured
    times = {"alone": [], "written": []}
    for k in range(rounds):
        t0 = time.perf_counter()
        sampling_only(k)
        times["alone"].append(time.perf_counter() - t0)
        times["written"].append(with_writing(k))
    alone, written = (n / sorted(times[k])[rounds // 2] for k in ("alone", "written"))
    summary = {"committed": len(list((work / "written0" / ".rows").glob("*.json")))}
    note = f"{n} samples, {model.sampler}-{model.steps}, batch {batch}"
    return [{"suite": "sampling", "metric": "generation, sampling only", "value": alone, "unit": "images/s",
             "note": note},
            {"suite": "sampling", "metric": "generation with writing", "value": written, "unit": "images/s",
             "note": note + f"; {summary['committed']} committed (NIfTI + row, fsync each file); the generation "
                            "loop until the last write, without the final manifest and previews"},
            {"suite": "sampling", "metric": "writing / sampling only", "value": written / alone, "unit": "x",
             "note": "same process; target >= 0.9"}]


# dense bf16 FLOP/s from NVIDIA's data sheets, by what torch.cuda.get_device_name() prints; the more specific
# names first (an "H100 PCIe" is not an H100 SXM: 756 vs 989 TFLOP/s)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))


def peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when the name is not in PEAK_BF16."""
    name = device_name.replace("-", " ")
    return next((v for k, v in PEAK_BF16 if k.lower() in name.lower()), None)


def tutorial_dataset(data, n: int):
    """The MONAI 2d_ddpm tutorial's data path over the same slices: a CacheDataset whose deterministic
    transforms run once (here: the slices are already preprocessed, as the tutorial caches them), items as
    dicts, batched by a DataLoader with worker processes."""
    from monai.data import CacheDataset
    from monai import transforms as T
    items = [{"image": data.images[i].float(), "seg": data.masks[i].float()} for i in range(n)]
    return CacheDataset(items, transform=T.EnsureTyped(keys=["image", "seg"], track_meta=False), progress=False)


def forward_flops(net, x, t) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        net(x, t)
    return counter.get_total_flops()


def timed_steps(step, n_warm: int, n: int, sync) -> float:
    for _ in range(n_warm):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t0) / n


def interleaved(steps: dict, n_warm: int, n: int, sync, rounds: int = 3) -> dict:
    """Seconds per call of each step, measured in alternation (A B C, A B C, ...) and the median of the
    rounds kept: on a shared or 2-core machine the speed drifts by more than the differences measured."""
    for step in steps.values():
        for _ in range(n_warm):
            step()
    sync()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            times[k].append(timed_steps(step, 1, n, sync))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def bench_training(device: str, preset: str, work: Path) -> list[dict]:
    """Baseline: a faithful copy of MONAI's 2d_ddpm tutorial loop (CacheDataset + DataLoader workers,
    DiffusionInferer + DDPMScheduler, Adam, fp16 autocast with GradScaler on CUDA, MONAI's default attention
    without SDPA, loss.item() every step), conditioned by channel concatenation like our bravo mode. Ours: the
    DiffusionTrainer's default path. Two ratios: step only (the same batch already on the device, no data
    path on either side) and end to end (each side's own data path)."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    from medgen.Generation.TrainGen.core.datasource import data_source
    from medgen.Generation.TrainGen.core.network import build_unet
    from medgen.Generation.TrainGen.core.run import cache_on_device
    from medgen.Generation.TrainGen.core.runtime import init_runtime
    from medgen.Generation.TrainGen.core.trainer import DiffusionTrainer
    n_subjects, shape, size, batch = PRESETS[preset]
    unet = MODEL_PRESETS[preset][0]
    root = ensure_demo_data(work / "demo", n_subjects, shape) / "brain"
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    n_warm, n_steps = (15, 50) if cuda else (1, 3) if preset == "ci" else (3, 10)
    rounds = 1 if preset == "ci" else 3                  # ci: every row once, not a measurement
    cfg = build_config({"data": {"image_size": size, "data_dir": str(root), "cache_dir": str(work / "cache")},
                        "model": {"preset": unet}, "mode": {"name": "bravo"}, "strategy": {"name": "ddpm"},
                        "optim": {"batch_size": batch}, "runtime": {"device": dev.type}})
    data = data_source(cfg).split(cfg.data, "train")

    # ---- baseline: the tutorial loop
    base = build_unet(cfg.model, 2, 1, flash_attention=False).to(dev)
    opt = torch.optim.Adam(base.parameters(), lr=2.5e-5)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    workers = min(4, len(__import__("os").sched_getaffinity(0)))
    loader = torch.utils.data.DataLoader(tutorial_dataset(data, len(data)), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=True,
                                         pin_memory=cuda)
    it = iter(loader)

    def base_update(img, seg):
        with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
            noise = torch.randn_like(img)
            t = torch.randint(0, scheduler.num_train_timesteps, (len(img),), device=dev).long()
            pred = inferer(inputs=img, diffusion_model=base, noise=noise, timesteps=t, condition=seg, mode="concat")
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss.item()                      # the tutorial accumulates epoch_loss += loss.item() every step

    def base_step():
        nonlocal it
        try:
            item = next(it)
        except StopIteration:
            it = iter(loader)
            item = next(it)
        base_update(item["image"].to(dev, non_blocking=True), item["seg"].to(dev, non_blocking=True))
    fixed = next(iter(loader))
    fixed_img, fixed_seg = fixed["image"].to(dev), fixed["seg"].to(dev)

    # ---- ours: the trainer's default path (data.cache_device auto: on the GPU when it fits, as train.py does)
    rt = init_runtime(cfg.runtime)
    on_gpu = cuda and cache_on_device("auto", dev, data)
    if on_gpu:
        data = data.to(dev)
    tr = DiffusionTrainer(cfg, rt, data)
    order = data.batch_indices(batch, 0, 0)
    k = 0
    fixed_batch = {key: v.to(dev) for key, v in data.batch(order[0]).items()}

    def our_step():
        nonlocal k
        tr.train_step([data.batch(order[k % len(order)])])
        k += 1
    for _ in range(10 if cuda else 0):                           # compilation, outside the timings
        our_step()
    sec = interleaved({"base_step": lambda: base_update(fixed_img, fixed_seg),
                       "ours_step": lambda: tr.train_step([fixed_batch]), "base": base_step, "ours": our_step},
                      n_warm, n_steps, sync, rounds)
    base_step_s, ours_step_s, base_s, ours_s = sec["base_step"], sec["ours_step"], sec["base"], sec["ours"]
    it = None                                        # the loader's workers stop with the iterator
    peak_mem = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None

    # ---- FLOPs, MFU, data path
    x = torch.randn(batch, 2, size, size, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev).float()
    flops = 3 * forward_flops(tr.net, x, t)  # forward + backward (about 2x forward)
    label = torch.cuda.get_device_name(dev) if cuda else "CPU"
    peak = peak_bf16(label) if cuda else None
    t0 = time.perf_counter()
    n_b = 0
    while time.perf_counter() - t0 < 1.0:
        for idx in order:
            data.batch(idx)
            n_b += 1
    sync()
    batch_rate = n_b / (time.perf_counter() - t0)
    note = f"{unet} UNet, {size}px bravo, batch {batch}, on {device}"
    amp = "fp16 autocast + GradScaler" if cuda else "fp32 (the tutorial's AMP is CUDA-only)"
    rows = [
        {"suite": "training", "metric": "MONAI tutorial step (same batch on device)", "value": batch / base_step_s,
         "unit": "images/s", "note": f"{note}; DiffusionInferer, Adam, {amp}, attention without SDPA"},
        {"suite": "training", "metric": "ours step (same batch on device)", "value": batch / ours_step_s,
         "unit": "images/s", "note": note + "; fused AdamW, SDPA, Min-SNR, EMA, device-side NaN guard"
                                         + ("; bf16, channels_last, compile" if cuda else "")},
        {"suite": "training", "metric": "step-only ratio ours / tutorial", "value": base_step_s / ours_step_s,
         "unit": "x", "note": "same process, data path excluded on both sides"},
        {"suite": "training", "metric": "MONAI tutorial end to end", "value": batch / base_s, "unit": "images/s",
         "note": f"CacheDataset + DataLoader ({workers} workers); median of {rounds} alternated rounds"},
        {"suite": "training", "metric": "ours end to end", "value": batch / ours_s, "unit": "images/s",
         "note": "slice cache " + ("on the GPU (data.cache_device auto)" if on_gpu
                                   else "in host memory")
                 + (f"; peak {peak_mem:.2f} GiB (both models resident)" if peak_mem else "")},
        {"suite": "training", "metric": "end-to-end ratio ours / tutorial", "value": base_s / ours_s, "unit": "x",
         "note": "same process"},
        {"suite": "training", "metric": "model FLOP/s (ours)", "value": flops / ours_step_s / 1e12, "unit": "TFLOP/s",
         "note": f"3 x {flops / 3 / 1e9:.1f} GFLOP forward per batch"},
        {"suite": "training", "metric": "MFU (ours)", "value": (flops / ours_step_s / peak) if peak else float("nan"),
         "unit": "fraction", "note": f"of {peak / 1e12:.0f} TFLOP/s dense bf16 ({label})" if peak else
         "n/a: no known peak for " + label},
        {"suite": "training", "metric": "data path / step rate", "value": batch_rate * ours_s, "unit": "x",
         "note": f"{batch_rate:.0f} cached batches/s vs {1 / ours_s:.1f} steps/s"},
    ]
    return rows


def bench_metrics(device: str, preset: str, work: Path) -> list[dict]:
    from medgen.eval.obj_eval.core import metrics as M
    from medgen.eval.obj_eval.core.networks import LPIPS, InceptionFID, RadImageNetFID
    from medgen.common.features import ResNet50Features
    size = PRESETS[preset][2]
    n = 4 if preset == "ci" else 16 if device == "cpu" else 512
    dev = torch.device(device)
    a, b = torch.rand(n, 1, size, size), torch.rand(n, 1, size, size)
    window, weights = M.ms_ssim_settings(size)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    jobs = [
        ("FID features, Inception-v3", "images/s", lambda: M.extract_features(InceptionFID().eval(), a, dev, 64)),
        ("FID features, RadImageNet", "images/s",
         lambda: M.extract_features(RadImageNetFID(ResNet50Features()).eval(), a, dev, 64)),
        ("LPIPS alex", "pairs/s", lambda: M.pair_distances(LPIPS("alex").eval().to(dev), a, b, dev, 64)),
        ("MS-SSIM", "pairs/s", lambda: M.pair_distances(lambda x, y: M.ms_ssim(x, y, 1.0, window, weights), a, b, dev)),
        ("MAE + PSNR", "pairs/s", lambda: (M.pair_distances(M.mae, a, b, dev), M.pair_distances(M.psnr, a, b, dev))),
    ]
    rows = []
    for name, unit, fn in jobs:
        fn()  # warm-up (allocations, kernels)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        rows.append({"suite": "metrics", "metric": name, "value": n / (time.perf_counter() - t0), "unit": unit,
                     "note": f"{n} images of {size}px, on {device}"})
    return rows


MINSNR_EPOCHS = {"ci": 2, "tiny": 100, "research": 200}   # ci: the test suite's size (every row, no quality)


def intensity_w1(synthetic: torch.Tensor, real: torch.Tensor) -> float:
    """Wasserstein-1 distance between the brain-voxel intensity histograms (background is 0)."""
    from scipy.stats import wasserstein_distance
    brain = lambda x: x[x > 0.02].numpy()  # noqa: E731
    return float(wasserstein_distance(brain(synthetic), brain(real)))


def bench_minsnr(device: str, preset: str, work: Path, seeds=(0, 1, 2), epochs: int | None = None) -> list[dict]:
    from medgen.eval.obj_eval.core.evaluate import Options, evaluate
    from medgen.Generation.TrainGen.core.run import train
    from medgen.Generation.TrainGen.generate import main as generate
    n_subjects, shape, size, batch = PRESETS[preset]
    root = ensure_demo_data(work / "demo", n_subjects, shape) / "brain"
    epochs = epochs or MINSNR_EPOCHS[preset]
    unet = MODEL_PRESETS[preset][0]
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for seed in seeds:
        for name, flag in (("off", False), ("on", True)):
            run = work / f"minsnr_{name}_{seed}"
            cfg = build_config(_tiny_yaml(), {"data": {"data_dir": str(root / "train"), "image_size": size,
                                                       "cache_dir": str(work / "cache"), "positive_only": True},
                                              "model": {"preset": unet}, "strategy": {"name": "rflow"},
                                              "mode": {"name": "bravo"}, "paths": {"run_dir": str(run)},
                                              "optim": {"min_snr": flag, "epochs": epochs, "batch_size": batch},
                                              "runtime": {"seed": seed, "device": device, "val_interval": 10 ** 6}})
            train(cfg)
            out = work / f"gen_{name}_{seed}"
            generate(["--image_model", str(run), "--masks_from", str(root / "val"), "--num_steps", "30",
                      "--batch_size", "32", "--output_dir", str(out), "--device", device, "--seed", str(seed)])
            res = evaluate(Options(str(out), str(root / "val"), metrics=("mae", "psnr", "ms_ssim"),
                                   positive_only=True, device=device, floor=False))
            m = {r["metric"]: r["value"] for r in res["metrics"]}
            synth, real = res["_sets"]
            m["intensity_w1"] = intensity_w1(synth.images, real.images)
            m["n"] = len(synth)
            results[name].append(m)
    rows = []
    keys = (("mae", "lower"), ("psnr", "higher"), ("ms_ssim_quality", "higher"), ("ms_ssim_diversity", "lower"),
            ("intensity_w1", "lower"))
    for key, better in keys:
        off = [m[key] for m in results["off"]]
        on = [m[key] for m in results["on"]]
        rows.append({"suite": "minsnr", "metric": f"{key} ({better} is better)", "value": sum(off) / len(off),
                     "unit": "min-snr off", "note": f"on: {sum(on) / len(on):.4g}; per seed off "
                     f"{', '.join(f'{v:.4g}' for v in off)} / on {', '.join(f'{v:.4g}' for v in on)}; "
                     f"{results['off'][0]['n']} samples, {epochs} epochs, {unet} UNet, {size} px"})
    return rows


REGION_STEPS = {"ci": 2, "tiny": 400, "research": 20000}    # optimizer steps per dual model
REGION_VARIANTS = (("binary masks, core + rim (1+4)", "binary", 0.0, [1, 4]),    # the phantoms' default binary mask
                   ("binary masks, whole tumour (1+2+4)", "binary", 0.0, [1, 2, 4]),
                   ("label maps", "brats2021", 0.0, None), ("label maps + region contrast", "brats2021", 0.1, None))


def bench_regions(device: str, preset: str, work: Path, seeds=(0, 1), steps: int | None = None) -> list[dict]:
    """Per-region faithfulness of dual (T1-pre + T1-gd) rectified-flow models conditioned three ways, side by side:
    on binary tumour masks (the conditioning before label maps existed: the phantoms' default, core + rim, and the
    whole tumour with data.tumour_labels [1, 2, 4]), on BraTS 2021 label maps, and on label maps with the
    region-specific contrastive loss (optim.region_contrast_weight 0.1). Every model draws one sample per real
    held-out slice, conditioned on that slice's mask (a binary model on the labels it was trained on);
    a label-map segmenter trained on the real training slices (the utility harness) scores each sample against
    the slice's label map per region (WT, TC, ET), and the enhancement ratio (T1-gd / T1-pre in a label over
    normal tissue) is measured inside ET and ED. Ask for it with --suite regions."""
    import numpy as np

    import medgen
    from medgen.common.labels import PRESETS as VOCABS
    from medgen.eval.obj_eval.core.regions import ratios, tensor_sums
    from medgen.eval.obj_eval.utility import audit, data, models
    n_subjects, shape, size, batch = PRESETS[preset]
    vocab = VOCABS["brats2021"]
    root = ensure_demo_data(work / "demo", n_subjects, shape) / "brain"
    roles = ["t1_pre", "t1_gd"]
    real, _ = data.load_real(root, size, roles, positive_only=True, compute="local", vocab=vocab)
    heldout = data.concat("real held-out", [real["val"], real["test"]])
    ref, log = models.cached_reference(models.TrainSettings("segmentation", "tiny", device=device), real["train"],
                                       real["val"], 0, work / "downstream")
    units, unit_of = heldout.unit_index()
    real_ratios = ratios(tensor_sums(heldout.images, heldout.targets, torch.from_numpy(unit_of), roles, vocab),
                         roles, vocab)
    steps = steps or REGION_STEPS[preset]
    results: dict[str, list[dict]] = {name: [] for name, *_ in REGION_VARIANTS}
    for name, labels, contrast, tumour in REGION_VARIANTS:
        for seed in seeds:
            run = medgen.train([_tiny_yaml(), {"data": {"labels": labels, "cache_dir": str(work / "cache"),
                                                        "image_size": size, "tumour_labels": tumour},
                                               "optim": {"max_steps": steps, "epochs": 10 ** 6, "batch_size": batch,
                                                         "region_contrast_weight": contrast},
                                               "model": {"preset": MODEL_PRESETS[preset][0]},
                                               "runtime": {"seed": seed, "device": device, "val_interval": 10 ** 6}}],
                               mode="dual", strategy="rflow", data_dir=str(root), positive_only=True,
                               run_dir=str(work / f"regions_{labels}_{contrast}_{'+'.join(map(str, tumour or []))}_"
                                                  f"{seed}"))
            masks = heldout.targets if tumour is None else torch.isin(heldout.targets, torch.tensor(tumour).float())
            out = medgen.load(run, device=device).sample(masks=masks.float(), seed=seed, steps=30, batch_size=64)
            images = torch.cat([out.images[r] for r in roles], 1)
            synth = data.TaskSet(f"synthetic {name}", images, heldout.targets, heldout.units, heldout.ids,
                                 vocab=vocab)
            rec = audit.faithfulness(ref, synth, real["test"], real["train"], device, seed)
            syn_ratios = ratios(tensor_sums(images, heldout.targets, torch.from_numpy(unit_of), roles, vocab),
                                roles, vocab)
            results[name].append({**{r: v["value"] for r, v in rec["regions"].items()},
                                  **{f"enhancement {k}": float(np.nanmean(syn_ratios[f"enhancement_{k}"]))
                                     for k in ("ET", "ED")}, "ceiling": {r: v["ceiling"]["mean"]
                                                                         for r, v in rec["regions"].items()}})
    rows = []
    for name, res in results.items():
        for key in ("WT", "TC", "ET", "enhancement ET", "enhancement ED"):
            vals = [r[key] for r in res]
            real_value = (res[0]["ceiling"][key] if key in res[0]["ceiling"] else
                          float(np.nanmean(real_ratios[key.replace(" ", "_")])))
            label = key if " " in key else f"faithfulness Dice {key}"
            rows.append({"suite": "regions", "metric": f"{name}: {label}",
                         "value": float(np.mean(vals)), "unit": "mean over seeds",
                         "note": f"per seed {', '.join(f'{v:.3f}' for v in vals)}; real {real_value:.3f}; "
                                 f"{len(heldout)} held-out slices, {steps} steps, {size} px"})
    return rows


EDIT_STEPS = {"ci": 2, "tiny": 400, "research": 20000}     # optimizer steps per model of the control/inpaint suites


def _train_tiny(work: Path, name: str, preset: str, device: str, steps: int, seed: int, root: Path, sections: dict,
                **flags) -> Path:
    import medgen
    n_subjects, shape, size, batch = PRESETS[preset]
    sections = {"data": {"cache_dir": str(work / "cache"), "image_size": size, **sections.get("data", {})},
                "optim": {"max_steps": steps, "epochs": 10 ** 6, "batch_size": batch, **sections.get("optim", {})},
                "model": {"preset": MODEL_PRESETS[preset][0]}, "strategy": {"sample_steps": 30},
                "runtime": {"seed": seed, "device": device, "val_interval": 10 ** 6, "checkpoint_every": 10 ** 6}}
    return medgen.train([_tiny_yaml(), sections], strategy="rflow", data_dir=str(root), run_dir=str(work / name),
                        **flags)


def _reference(root: Path, size: int, device: str, work: Path, preset: str):
    """The real splits (bravo, binary tumour masks) and the downstream segmenter trained on the real training
    slices, as the utility harness makes them (ci: 20 steps, every row and no quality)."""
    from medgen.eval.obj_eval.utility import data, models
    real, _ = data.load_real(root, size, ["bravo"], positive_only=True, compute="local")
    heldout = data.concat("real held-out", [real["val"], real["test"]])
    settings = models.TrainSettings("segmentation", "tiny", 20 if preset == "ci" else None, device=device)
    ref, _ = models.cached_reference(settings, real["train"], real["val"], 0, work / "downstream")
    return real, heldout, ref


def bench_control(device: str, preset: str, work: Path, seeds=(0, 1), steps: int | None = None) -> list[dict]:
    """Mask control for a frozen generator: an unconditional bravo model (`image`) trained first and frozen; a
    ControlNet trained over it; a concatenation-conditioned bravo model trained from scratch for the same steps on
    the same data. Each draws one sample per real held-out slice, conditioned on that slice's tumour mask (the
    frozen model ignores it); scored by faithfulness (the real-data segmenter's Dice against the mask), MAE and
    PSNR against the real slice, and the brain-intensity Wasserstein-1 distance. Ask for it with --suite control."""
    import numpy as np

    import medgen
    from medgen.eval.obj_eval.core import metrics as M
    from medgen.eval.obj_eval.utility import audit, data
    n_subjects, shape, size, batch = PRESETS[preset]
    root = ensure_demo_data(work / "demo", n_subjects, shape) / "brain"
    real, heldout, ref = _reference(root, size, device, work, preset)
    steps = steps or EDIT_STEPS[preset]
    results: dict[str, list[dict]] = {"frozen unconditional": [], "ControlNet over it": [],
                                      "concatenation (from scratch)": []}
    for seed in seeds:
        base = _train_tiny(work, f"image_{seed}", preset, device, steps, seed, root, {}, mode="image")
        runs = {"frozen unconditional": base,
                "ControlNet over it": _train_tiny(work, f"control_{seed}", preset, device, steps, seed, root, {},
                                                  control_from=str(base), positive_only=True),
                "concatenation (from scratch)": _train_tiny(work, f"concat_{seed}", preset, device, steps, seed, root,
                                                            {}, mode="bravo", positive_only=True)}
        for name, run in runs.items():
            pipe = medgen.load(run, device=device)
            kwargs = {"masks": heldout.targets} if pipe.needs == "mask" else {"n": len(heldout)}
            images = pipe.sample(seed=seed, batch_size=64, **kwargs).images["bravo"]
            synth = data.TaskSet(name, images, heldout.targets, heldout.units, heldout.ids)
            rec = audit.faithfulness(ref, synth, real["test"], real["train"], device, seed)
            results[name].append({"faithfulness Dice": rec["value"], "ceiling": rec["ceiling"]["mean"],
                                  "MAE": float(M.mae(images, heldout.images).mean()),
                                  "PSNR": float(M.psnr(images, heldout.images).mean()),
                                  "intensity W1": intensity_w1(images, heldout.images)})
    rows = []
    for name, res in results.items():
        for key in ("faithfulness Dice", "MAE", "PSNR", "intensity W1"):
            vals = [r[key] for r in res]
            rows.append({"suite": "control", "metric": f"{name}: {key}", "value": float(np.mean(vals)),
                         "unit": "mean over seeds", "note": f"per seed {', '.join(f'{v:.3f}' for v in vals)}; "
                         + (f"real {res[0]['ceiling']:.3f}; " if key == "faithfulness Dice" else "")
                         + f"{len(heldout)} held-out slices, {steps} steps each, {size} px"})
    return rows


def bench_inpaint(device: str, preset: str, work: Path, seeds=(0, 1), steps: int | None = None,
                  n_samples: int = 64) -> list[dict]:
    """Lesions inserted into the real held-out scans (generate.py --inpaint_into, lesions from the real training
    label maps) by a trained `inpaint` model (known pixels put back at the end, after every step, or every step with
    5 RePaint jumps) and by RePaint (5 jumps) with a mask-conditioned bravo model trained for the same steps on the
    same data; scored by identity outside the region (max |difference|, 0 when kept), the
    seam (gradient magnitude on the region's border, edited over source), FLAIR contrast inside the inserted edema
    and enhancing tumour (over normal tissue; real lesions beside), and faithfulness (the real-data segmenter's
    Dice against the written mask: the scan's own tumour and the inserted lesion). Ask for it with --suite inpaint."""
    import numpy as np

    from medgen.eval.obj_eval.core.evaluate import Options, evaluate
    from medgen.eval.obj_eval.utility import audit, data
    from medgen.Generation.TrainGen.generate import main as generate
    n_subjects, shape, size, batch = PRESETS[preset]
    root = ensure_demo_data(work / "demo", n_subjects, shape) / "brain"
    real, _, ref = _reference(root, size, device, work, preset)
    steps = steps or EDIT_STEPS[preset]
    labels = {"data": {"labels": "brats2021"}}
    variants = {"inpaint model, known pixels at the end": ("inpaint", ["--inpaint_replace", "end"]),
                "inpaint model, known pixels every step": ("inpaint", ["--inpaint_replace", "every"]),
                "inpaint model, every step, 5 jumps": ("inpaint", ["--repaint_jumps", "5"]),
                "RePaint with a bravo model, 5 jumps": ("bravo", ["--repaint_jumps", "5"])}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in seeds:
        runs = {"inpaint": _train_tiny(work, f"inpaint_{seed}", preset, device, steps, seed, root, labels,
                                       mode="inpaint"),
                "bravo": _train_tiny(work, f"bravo_{seed}", preset, device, steps, seed, root, labels, mode="bravo",
                                     positive_only=True)}
        for k, (name, (model, flags)) in enumerate(variants.items()):
            out = work / f"inserted_{k}_{seed}"
            generate(["--image_model", str(runs[model]), "--inpaint_into", str(root / "test"), "--masks_from",
                      str(root / "train"), "--num_images", str(n_samples), "--seed", str(seed), "--output_dir", str(out),
                      "--device", device, "--max_attempts", "200", "--max_lesion_area", "0.03", *flags])
            ev = {r["metric"]: r for r in evaluate(Options(str(out), str(root / "test"), metrics=("inpainting",),
                                                           device=device, floor=False))["metrics"]}
            synth = data.load_synthetic(out, size, ["bravo"], real["train"], "local")
            faith = audit.faithfulness(ref, synth, real["test"], real["train"], device, seed)
            results[name].append({"outside max |diff|": ev["inpaint_outside_max_abs_diff"]["value"],
                                  "seam (edited / source)": ev["inpaint_seam"]["value"],
                                  "FLAIR in ED / normal": ev["inpaint_contrast_2"]["value"],
                                  "FLAIR in ET / normal": ev["inpaint_contrast_4"]["value"],
                                  "faithfulness Dice": faith["value"],
                                  "real": {"FLAIR in ED / normal": ev["inpaint_contrast_2"]["real"]["value"],
                                           "FLAIR in ET / normal": ev["inpaint_contrast_4"]["real"]["value"],
                                           "faithfulness Dice": faith["ceiling"]["mean"]}})
    rows = []
    for name, res in results.items():
        for key in ("outside max |diff|", "seam (edited / source)", "FLAIR in ED / normal", "FLAIR in ET / normal",
                    "faithfulness Dice"):
            vals = [np.nan if r[key] is None else r[key] for r in res]
            ref_value = res[0]["real"].get(key)
            rows.append({"suite": "inpaint", "metric": f"{name}: {key}", "value": float(np.nanmean(vals)),
                         "unit": "mean over seeds", "note": f"per seed {', '.join(f'{v:.3f}' for v in vals)}; "
                         + (f"{'before' if 'FLAIR' in key else 'real'} {ref_value:.3f}; " if ref_value is not None else "")
                         + f"{n_samples} insertions into the test scans, {steps} steps each, {size} px"})
    return rows


NFE_GRID = {"ddpm": (("ddpm", 1000), ("ddim", 10), ("ddim", 50), ("dpmpp_2m", 5), ("dpmpp_2m", 10), ("dpmpp_2m", 20)),
            "rflow": (("euler", 5), ("euler", 10), ("euler", 30), ("heun", 3), ("heun", 5), ("heun", 10))}


def bench_nfe(device: str, preset: str, work: Path, epochs: int | None = None, n_samples: int = 64,
              grid: dict | None = None) -> list[dict]:
    """Quality vs network evaluations and wall time: one bravo model per strategy, then every sampler at several
    step counts on the same real validation masks and seeds. Quality, computable offline: the Fréchet distance
    in the feature space of a downstream segmenter trained on the real training slices (the utility harness),
    and the Wasserstein-1 distance between brain-intensity histograms, both against the real validation slices."""
    from medgen.eval.obj_eval.utility import audit, data
    from medgen.Generation.TrainGen.core.run import train
    from medgen.Generation.TrainGen.core.samplers import nfe
    from medgen.Generation.TrainGen.generate import main as generate
    n_subjects, shape, size, batch = PRESETS[preset]
    root = ensure_demo_data(work / "demo", n_subjects, shape) / "brain"
    epochs = epochs or MINSNR_EPOCHS[preset]
    real, heldout, ref = _reference(root, size, device, work, preset)
    rows = []
    for strategy, samplers in (grid or NFE_GRID).items():
        run = work / f"nfe_{strategy}"
        train(build_config(_tiny_yaml(), {"data": {"data_dir": str(root / "train"), "image_size": size,
                                                   "cache_dir": str(work / "cache"), "positive_only": True},
                                          "model": {"preset": MODEL_PRESETS[preset][0]}, "strategy": {"name": strategy},
                                          "mode": {"name": "bravo"}, "paths": {"run_dir": str(run)},
                                          "optim": {"epochs": epochs, "batch_size": batch},
                                          "runtime": {"device": device, "val_interval": 10 ** 6}}))
        for sampler, steps in samplers:
            out = work / f"gen_{strategy}_{sampler}_{steps}"
            t0 = time.perf_counter()
            generate(["--image_model", str(run), "--masks_from", str(root / "val"), "--sampler", sampler,
                      "--num_steps", str(steps), "--num_images", str(n_samples), "--batch_size", "32",
                      "--output_dir", str(out), "--device", device, "--seed", "0"])
            wall = time.perf_counter() - t0
            syn = data.load_synthetic(out, size, ["bravo"], real["train"], compute="local")
            fid = audit.domain(ref, syn, heldout, device, n_boot=0)[0]["value"]
            w1 = intensity_w1(syn.images, heldout.images)
            rows.append({"suite": "nfe", "metric": f"{strategy} {sampler}-{steps}", "value": fid,
                         "unit": "FD (downstream)", "nfe": nfe(sampler, steps), "seconds": wall, "w1": w1,
                         "note": f"NFE {nfe(sampler, steps)}, {wall:.1f} s for {len(syn)} images, intensity W1 "
                                 f"{w1:.4f}; {epochs} epochs, {MODEL_PRESETS[preset][0]} UNet, {size} px"})
    return rows


def plot_nfe(rows: list[dict], path: Path) -> Path:
    """Quality vs NFE and vs wall time, one line per (strategy, sampler)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r["metric"].rsplit("-", 1)[0], []).append(r)
    for name, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        axes[0].plot([r["nfe"] for r in rs], [r["value"] for r in rs], marker="o", label=name)
        axes[1].plot([r["seconds"] for r in rs], [r["value"] for r in rs], marker="o", label=name)
    for ax, xlabel in zip(axes, ("network evaluations (NFE)", "wall time (s)")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Fréchet distance, downstream features (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


VOLUME_SHAPES = {("ci", "cpu"): [32, 32, 16], ("ci", "cuda"): [32, 32, 16], ("tiny", "cpu"): [32, 32, 16], ("tiny", "cuda"): [64, 64, 48], ("research", "cpu"): [64, 64, 48],
                 ("research", "cuda"): [128, 128, 96]}   # H, W, D (data.volume_shape)
PROBE_SHAPES = [[64, 64, 48], [128, 128, 96], [160, 160, 128], [192, 192, 144], [256, 256, 192], [320, 320, 240]]


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while fn() runs (the activation memory of a
    training step, measurable on CPU too)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def volume_step(device, volume_shape: list[int], latent: bool, checkpointing: bool, batch: int, unet: str):
    """One bravo training step on volumes as the trainer takes it (rflow; pixel space, or on a 4x autoencoder's
    latents encoded on the fly): (step function, its network)."""
    from medgen.Generation.TrainGen.core.latent import build_autoencoder
    from medgen.Generation.TrainGen.core.network import build_unet
    cfg = build_config({"data": {"spatial_dims": 3, "volume_shape": volume_shape},
                        "model": {"preset": unet, "gradient_checkpointing": checkpointing}})
    dev = torch.device(device)
    ae = build_autoencoder(cfg.latent, 3, 1).to(dev).eval().requires_grad_(False) if latent else None
    grid = cfg.data.shape
    net = build_unet(cfg.model, 2 if not latent else cfg.latent.latent_channels + 1,
                     1 if not latent else cfg.latent.latent_channels, spatial_dims=3).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    image, mask = torch.rand(batch, 1, *grid, device=dev) * 2 - 1, torch.rand(batch, 1, *grid, device=dev).round() * 2 - 1
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with torch.no_grad():
            x0 = ae.encode(image)[0] if latent else image
            cond = torch.nn.functional.interpolate(mask, size=x0.shape[2:], mode="area") if latent else mask
        t = torch.rand(batch, device=dev)
        noise = torch.randn_like(x0)
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        with autocast:
            pred = net(torch.cat([x_t, cond], 1), t * 1000)
        loss = (pred.float() - (noise - x0)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    net.train()
    return step, net


def bench_volumes(device: str, preset: str, work: Path) -> list[dict]:
    """Training throughput and memory on whole volumes: pixel space, pixel space with gradient checkpointing,
    and latent (AutoencoderKL 4x per axis); on CUDA also the largest volume that trains at batch 1."""
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    shape = VOLUME_SHAPES[(preset, dev.type)]
    unet, batch = MODEL_PRESETS[preset][0] if dev.type == "cuda" else "tiny", 2
    n_warm, n = (1, 1) if preset == "ci" else (1, 3) if dev.type == "cpu" else (3, 10)
    rows = []
    for name, latent, ckpt in (("pixel", False, False), ("pixel + checkpointing", False, True),
                               ("latent (4x AE)", True, False)):
        step, _ = volume_step(device, shape, latent, ckpt, batch, unet)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        sec = timed_steps(step, n_warm, n, sync)
        memory = (torch.cuda.max_memory_allocated(dev) / 2**30, "GiB peak (CUDA)") if dev.type == "cuda" else \
            (saved_activation_bytes(step) / 2**20, "MiB saved for backward")
        label = "x".join(map(str, shape))
        rows += [{"suite": "volumes", "metric": f"{name} {label}", "value": batch / sec, "unit": "volumes/s",
                  "note": f"UNet {unet}, batch {batch}, rflow step"},
                 {"suite": "volumes", "metric": f"{name} {label} memory", "value": memory[0], "unit": memory[1],
                  "note": "the same step"}]
    if dev.type == "cuda":
        for latent in (False, True):
            fits = None
            for probe in PROBE_SHAPES:
                try:
                    step, net = volume_step(device, probe, latent, not latent, 1, unet)
                    step()
                    sync()
                    fits = probe
                except torch.cuda.OutOfMemoryError:
                    break
                finally:
                    torch.cuda.empty_cache()
            rows.append({"suite": "volumes", "metric": f"largest volume at batch 1 ({'latent' if latent else 'pixel'})",
                         "value": float("nan") if fits is None else fits[0] * fits[1] * fits[2], "unit": "voxels",
                         "note": "x".join(map(str, fits)) if fits else "none of the probe shapes fit"})
    return rows


COPIES_PRESETS = {"ci": (12, 2, (32, 32, 12), 32), "tiny": (60, 20, (64, 64, 24), 64),
                  "research": (60, 20, (128, 128, 48), 128)}   # subjects, train subjects, volume, image size


def copy_transforms(x: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """Transformed copies of the (N, C, S, S) images x in [0, 1], each image with its own random parameters
    (direction of a move, offset of a crop) drawn from seed."""
    import math

    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter
    g = torch.Generator().manual_seed(seed)
    n, s = len(x), x.shape[-1]

    def each(fn):
        return torch.stack([fn(img) for img in x])

    directions = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]

    def move(img, px):                      # zero-filled, by px along a random one of the 8 directions
        dy, dx = (px * v for v in directions[int(torch.randint(8, (1,), generator=g))])
        out = torch.zeros_like(img)
        out[..., max(dy, 0):s + min(dy, 0), max(dx, 0):s + min(dx, 0)] = \
            img[..., max(-dy, 0):s + min(-dy, 0), max(-dx, 0):s + min(-dx, 0)]
        return out

    def crop(img, lo, hi):                  # a crop of a random fraction in [lo, hi] at a random offset, resized
        c = int(round(s * (lo + (hi - lo) * float(torch.rand(1, generator=g)))))
        oy, ox = (int(v) for v in torch.randint(s - c + 1, (2,), generator=g))
        return F.interpolate(img[None, :, oy:oy + c, ox:ox + c], size=(s, s), mode="bilinear",
                             align_corners=False)[0]

    def zoom_out(img, frac):                # shrunk and zero-padded at a random offset
        c = int(round(s * frac))
        small = F.interpolate(img[None], size=(c, c), mode="bilinear", align_corners=False, antialias=True)[0]
        oy, ox = (int(v) for v in torch.randint(s - c + 1, (2,), generator=g))
        return F.pad(small, (ox, s - c - ox, oy, s - c - oy))

    def rotate(imgs, deg):
        a = math.radians(deg)
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]], dtype=imgs.dtype)
        grid = F.affine_grid(theta.expand(len(imgs), 2, 3), imgs.shape, align_corners=False)
        return F.grid_sample(imgs, grid, align_corners=False, padding_mode="zeros")

    noise = lambda sd: (x + sd * torch.randn(x.shape, generator=g)).clamp(0, 1)  # noqa: E731
    return {
        "exact copy": x,
        "move 3 px, random direction": each(lambda i: move(i, 3)),
        "move 4 px, random direction": each(lambda i: move(i, 4)),
        "move 5 px, random direction": each(lambda i: move(i, 5)),
        "mirror left-right + move 3 px": each(lambda i: move(i.flip(-1), 3)),
        "flip up-down": x.flip(-2),
        "turn 180 degrees": x.flip(-1, -2),
        "crop 90-95% at a random offset + resize": each(lambda i: crop(i, 0.90, 0.95)),
        "crop 80-90% at a random offset + resize": each(lambda i: crop(i, 0.80, 0.90)),
        "shrink to 85% + pad at a random offset": each(lambda i: zoom_out(i, 0.85)),
        "rotate 2 degrees": rotate(x, 2), "rotate 5 degrees": rotate(x, 5), "rotate 10 degrees": rotate(x, 10),
        "intensity x0.7 + 0.1": (x * 0.7 + 0.1).clamp(0, 1),
        "gamma 0.6": x.clamp(0, 1) ** 0.6,
        "noise sd 0.02": noise(0.02), "noise sd 0.05": noise(0.05), "noise sd 0.10": noise(0.10),
        "blur sigma 1 px": torch.from_numpy(gaussian_filter(x.numpy(), (0, 0, 1, 1))).float(),
    }


def bench_copies(device: str, preset: str, work: Path, seed: int = 0) -> list[dict]:
    """What audit.memorization's copy distance flags (docs/utility.md prints the tiny preset's table): copies
    of every training slice transformed (copy_transforms) and one slice of each of 40 fresh phantoms (other
    subjects of another seed: no copy), each set against the thresholds from one held-out slice per held-out
    subject (drawn with `seed`). Rows: the share below the p1 and p5 thresholds and the median copy distance;
    then seconds per query of the copy distance against the whole training set."""
    from medgen.Generation.TrainGen.core.phantom import make_subject, write_subject
    from medgen.common.neighbours import CopyIndex
    from medgen.eval.obj_eval.utility import audit, data
    n_subjects, n_train, shape, size = COPIES_PRESETS[preset]
    root = work / "copies" / "brain"
    for i in range(n_subjects):
        split = "train" if i < n_train else "val" if i < n_train + max(1, n_subjects // 12) else "test"
        write_subject(root / split / f"s{i:02d}", make_subject(5, i, shape))
    n_fresh = 40 if preset != "ci" else 8
    for i in range(n_fresh):
        write_subject(root.parent / "fresh" / "train" / f"f{i:02d}", make_subject(77, i, shape))
    sets, _ = data.load_real(root, size, ["bravo"], positive_only=True, compute="local")
    train, held = sets["train"], sets["test"]
    fresh = data.load_synthetic(root.parent / "fresh", size, ["bravo"], train, compute="local")
    fresh = fresh.subset(audit.one_per_unit(fresh.units, seed))
    note = (f"{size} px phantoms; {len(train)} training slices of {len(set(train.units))} subjects; threshold from "
            f"{len(set(held.units))} held-out subjects (one slice each, seed {seed})")
    rows = []
    cases = list(copy_transforms(train.images).items()) + [("fresh phantoms (no copy)", None)]
    for name, imgs in cases:
        syn = fresh if imgs is None else data.TaskSet(name, imgs, train.targets, train.units, train.ids)
        rec = audit.memorization(syn, train, held, device=device, seed=seed)
        px = rec["sections"]["pixel"]
        for q in ("p1", "p5"):
            b = px["below"][q]
            rows.append({"suite": "copies", "metric": f"{name}: below held-out {q}", "value": b["fraction"],
                         "unit": "fraction", "note": f"expected {b['expected']:.3f} without copying, 95% range "
                         f"{b['null_range'][0]:.3f}-{b['null_range'][1]:.3f}{' EXCESS' if b['excess'] else ''}"})
        rows.append({"suite": "copies", "metric": f"{name}: median copy distance", "value": px["synthetic_nn"]["median"],
                     "unit": "distance", "note": f"held-out median {px['heldout_nn']['median']:.4f}"})
    index = CopyIndex(train.images, device)
    t0 = time.perf_counter()
    index.query(held.images)
    rows.append({"suite": "copies", "metric": "copy distance: seconds per query", "value":
                 (time.perf_counter() - t0) / len(held), "unit": "s", "note": note})
    return rows


def _tiny_yaml() -> dict:
    from medgen.Generation.TrainGen.core.config import load_yaml
    return load_yaml(Path(__file__).resolve().parents[1] / "config" / "tiny.yaml")


def bench_gpu(device: str, preset: str, work: Path) -> list[dict]:
    """What only a GPU shows (bench/gpu_check.sh runs it with the other suites; on a CPU it runs at its sizes
    and says so): bravo training images/s for ddpm and rflow with compile off and on, with the first compiled
    step's time; DDIM-50 images/s of our sampler against diffusers' DDIMScheduler driving the same network;
    and the batch-invariance difference of generate.py's sampling on this device."""
    import copy

    from diffusers import DDIMScheduler

    from medgen.Generation.TrainGen.core.generate import Job, draw
    from medgen.Generation.TrainGen.core.generation.models import BatchInvariant, Model
    from medgen.Generation.TrainGen.core.network import build_unet
    from medgen.Generation.TrainGen.core.runtime import init_runtime
    from medgen.Generation.TrainGen.core.parts import build_parts
    from medgen.Generation.TrainGen.core.trainer import DiffusionTrainer
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    n_subjects, shape, size, batch = PRESETS[preset]
    unet = MODEL_PRESETS[preset][0]
    root = ensure_demo_data(work / "demo", n_subjects, shape) / "brain"
    rows, note = [], f"{unet} UNet, {size}px bravo, batch {batch}, on {device}"
    for strategy in ("ddpm", "rflow"):
        for compiled in (False, True):
            if compiled and not cuda:
                continue                  # inductor on a CPU takes minutes per graph: a GPU figure only
            cfg = build_config({"data": {"image_size": size, "data_dir": str(root), "cache_dir": str(work / "cache")},
                                "model": {"preset": unet}, "mode": {"name": "bravo"}, "strategy": {"name": strategy},
                                "optim": {"batch_size": batch}, "runtime": {"device": dev.type, "compile": compiled}})
            rt = init_runtime(cfg.runtime)
            from medgen.Generation.TrainGen.core.datasource import data_source
            data = data_source(cfg).split(cfg.data, "train").to(dev)
            tr = DiffusionTrainer(cfg, rt, data)
            order = data.batch_indices(batch, 0, 0)
            t0 = time.perf_counter()
            tr.train_step([data.batch(order[0])])
            sync()
            first = time.perf_counter() - t0
            k = [1]

            def step():
                tr.train_step([data.batch(order[k[0] % len(order)])])
                k[0] += 1
            sec = timed_steps(step, 5 if cuda else 1, 30 if cuda else 3, sync)
            label = f"train {strategy}, compile {'on' if compiled else 'off'}"
            rows += [{"suite": "gpu", "metric": label, "value": batch / sec, "unit": "images/s", "note": note},
                     {"suite": "gpu", "metric": f"{label}: first step", "value": first, "unit": "s",
                      "note": "includes compilation" if compiled else "eager"}]
    # sampling: ours against diffusers' scheduler on the same network and noise
    cfg = build_config({"model": {"preset": unet}, "data": {"image_size": size}, "strategy": {"name": "ddpm"},
                        "mode": {"name": "bravo"}})
    strat, mode = build_parts(cfg, None, None)
    net = build_unet(cfg.model, mode.in_channels, mode.out_channels).to(dev).eval()
    n = MODEL_PRESETS[preset][1]
    mask = (torch.rand(n, 1, size, size, device=dev) > 0.9).float() * 2 - 1
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
    model = Model(BatchInvariant(copy.deepcopy(net)), strat, mode, cfg, {}, Path("-"), "", "ddim", 50)
    job = Job(mode="bravo", output_dir=work, num_images=n, batch_size=n, device=dev, autocast=autocast)
    draw(job, replace(model, steps=2), list(range(2)), {"concat": mask[:2]})
    sync()
    t0 = time.perf_counter()
    draw(job, model, list(range(n)), {"concat": mask})
    sync()
    ours = n / (time.perf_counter() - t0)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True)
    ref.set_timesteps(50)
    x = torch.randn(n, 1, size, size, device=dev)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad(), (autocast() if autocast else torch.autocast(dev.type, enabled=False)):
        for t in ref.timesteps:
            eps = net(torch.cat([x, mask], 1), t.to(dev).float().expand(n)).float()
            x = ref.step(eps, t, x).prev_sample
    sync()
    theirs = n / (time.perf_counter() - t0)
    rows += [{"suite": "gpu", "metric": "sampling ddim-50 (ours, generate.py path)", "value": ours,
              "unit": "images/s", "note": f"batch {n}; per-sample generators, batch-invariant UNet"},
             {"suite": "gpu", "metric": "sampling ddim-50 (diffusers DDIMScheduler)", "value": theirs,
              "unit": "images/s", "note": "the same network and batch, one generator"},
             {"suite": "gpu", "metric": "sampling ours / diffusers", "value": ours / theirs, "unit": "x", "note": ""}]
    # batch invariance: the same seeds alone and in a batch
    seeds = list(range(4))
    together = draw(job, replace(model, steps=5), seeds, {"concat": mask[:4]})
    alone = torch.cat([draw(job, replace(model, steps=5), [s], {"concat": mask[s:s + 1]}) for s in seeds])
    rows.append({"suite": "gpu", "metric": "batch invariance: max |batch of 4 - one by one|",
                 "value": float((together.float() - alone.float()).abs().max()), "unit": "abs",
                 "note": "0 on CPU (tested); on CUDA cuDNN/cuBLAS pick kernels by shape: same seeds give the same "
                         "noise, values agree to rounding unless torch.use_deterministic_algorithms"})
    return rows


SUITES = {"data": bench_data, "training": bench_training, "sampling": bench_sampling, "metrics": bench_metrics,
          "minsnr": bench_minsnr, "nfe": bench_nfe, "volumes": bench_volumes, "gpu": bench_gpu,
          "regions": bench_regions, "control": bench_control, "inpaint": bench_inpaint, "copies": bench_copies}
DEFAULT_SUITES = ("data", "training", "sampling", "metrics", "volumes")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--suite", choices=list(SUITES), action="append",
                   help=f"default: {', '.join(DEFAULT_SUITES)} (the others only when asked)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--plot", type=Path, default=Path("bench/nfe.png"), help="nfe suite: where its plot goes")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI transform defaults, irrelevant here
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.suite or DEFAULT_SUITES:
            rows += SUITES[name](args.device, args.preset, Path(tmp))
    if any(r["suite"] == "nfe" for r in rows):
        print(f"plot: {plot_nfe([r for r in rows if r['suite'] == 'nfe'], args.plot)}")
    label = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {label}  torch {torch.__version__}  preset {args.preset}")
    print(tabulate([[r["suite"], r["metric"], "n/a" if r["value"] != r["value"] else f"{r['value']:.4g}", r["unit"],
                     r["note"]] for r in rows],
                   headers=["suite", "metric", "value", "unit", "note"]))
    if args.json:
        rows = [{**r, "value": None if r["value"] != r["value"] else r["value"]} for r in rows]
        args.json.write_text(json.dumps({"device": label, "torch": torch.__version__, "preset": args.preset,
                                         "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
