"""The project's benchmark: prints a table and writes JSON.

    python bench/benchmark.py --device cpu --preset tiny [--suite data] [--json out.json]

Suites
  data   slice-cache build rate (slices/s, reading + checking + preprocessing NIfTI) and the batch rate
         served from the in-memory cache (batches/s), on the embedded demo dataset.
  sampling  images/s of generate.py's sampling path (per-sample generators, batch-invariant UNet, bf16 on
         CUDA) for DDPM-1000 (ancestral), DDIM-50 and RFlow Euler-30 on the same bravo UNet (random weights:
         the cost does not depend on them).
  metrics  images/s (or pairs/s) of each evaluation metric: Inception and RadImageNet feature extraction,
         LPIPS, MS-SSIM, MAE+PSNR, on random images (random weights: same cost as the published ones).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from Generation.TrainGen.core.config import build_config  # noqa: E402
from Generation.TrainGen.core.dataset import load_split  # noqa: E402
from Generation.TrainGen.core.phantom import ensure_demo_data  # noqa: E402

PRESETS = {  # subjects, volume shape, image size, batch size
    "tiny": (16, (64, 64, 48), 32, 16),
    "research": (40, (128, 128, 64), 128, 16),
}
MODEL_PRESETS = {"tiny": ("tiny", 16), "research": ("base128", 256)}  # UNet preset, sampling batch


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
    while time.perf_counter() - t0 < 2.0:
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
    from Generation.TrainGen.core.generate import BatchInvariant, Job, Model, draw
    from Generation.TrainGen.core.network import build_unet
    from Generation.TrainGen.core.trainer import build_parts
    unet, batch = MODEL_PRESETS[preset]
    size = PRESETS[preset][2]
    dev = torch.device(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else None
    job = Job(mode="bravo", output_dir=work, num_images=batch, batch_size=batch, device=dev, autocast=autocast)
    mask = (torch.rand(batch, 1, size, size, device=dev) > 0.9).float()
    rows = []
    for strategy, sampler, steps in (("ddpm", "ddpm", 1000), ("ddpm", "ddim", 50), ("rflow", "euler", 30)):
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
    return rows


def bench_metrics(device: str, preset: str, work: Path) -> list[dict]:
    from eval.obj_eval.core import metrics as M
    from eval.obj_eval.core.networks import LPIPS, InceptionFID, RadImageNetFID
    from Generation.TrainGen.core.features import ResNet50Features
    size = PRESETS[preset][2]
    n = 16 if device == "cpu" else 512
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


SUITES = {"data": bench_data, "sampling": bench_sampling, "metrics": bench_metrics}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--suite", choices=list(SUITES), action="append", help="default: all suites")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.suite or list(SUITES):
            rows += SUITES[name](args.device, args.preset, Path(tmp))
    label = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {label}  torch {torch.__version__}  preset {args.preset}")
    print(tabulate([[r["suite"], r["metric"], f"{r['value']:.4g}", r["unit"], r["note"]] for r in rows],
                   headers=["suite", "metric", "value", "unit", "note"]))
    if args.json:
        args.json.write_text(json.dumps({"device": label, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
