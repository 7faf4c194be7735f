"""Launched by test_distributed.py under torchrun: trains a few DDP steps, checks the replicas agree."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from medgen.Generation.TrainGen.core.config import build_config, load_yaml  # noqa: E402
from medgen.Generation.TrainGen.core.datasource import data_source  # noqa: E402
from medgen.Generation.TrainGen.core.runtime import init_runtime, shutdown  # noqa: E402
from medgen.Generation.TrainGen.core.trainer import DiffusionTrainer  # noqa: E402

demo, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = build_config(load_yaml(Path(__file__).resolve().parents[1] / "config" / "tiny.yaml"),
                   {"data": {"data_dir": str(demo / "brain"), "cache_dir": str(out / "cache")},
                    "runtime": {"multi_gpu": True}, "optim": {"batch_size": 4}})
rt = init_runtime(cfg.runtime)
src = data_source(cfg)
if rt.rank != 0:
    dist.barrier()
data = src.split(cfg.data, "train")
if rt.rank == 0:
    dist.barrier()
tr = DiffusionTrainer(cfg, rt, data)
order = data.batch_indices(4, 0, cfg.runtime.seed, rt.rank, rt.world)
seen = []
for i in range(4):
    tr.train_step([data.batch(order[i])])
    seen += order[i].tolist()
noise = torch.randn(4, generator=tr.gen)  # per-rank streams must differ
flat = torch.cat([p.detach().flatten() for p in tr.net.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(rt.world)]
dist.all_gather(gathered, flat)
noises = [torch.zeros_like(noise) for _ in range(rt.world)]
dist.all_gather(noises, noise)
idx = [None] * rt.world
dist.all_gather_object(idx, seen)
if rt.rank == 0:
    (out / "result.json").write_text(json.dumps({
        "world": rt.world, "equal": all(torch.equal(gathered[0], g) for g in gathered),
        "noise_differs": not torch.equal(noises[0], noises[1]),
        "data_disjoint": not set(idx[0]) & set(idx[1]), "steps": tr.step}))
shutdown(rt)
