"""The project's benchmark: prints a table and writes JSON.

    python bench/benchmark.py --device cpu --preset tiny [--suite data] [--json out.json]

Suites
  data   slice-cache build rate (slices/s, reading + checking + preprocessing NIfTI) and the batch rate
         served from the in-memory cache (batches/s), on the embedded demo dataset.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
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


SUITES = {"data": bench_data}


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
