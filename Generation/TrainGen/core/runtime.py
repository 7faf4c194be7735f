"""Process-level setup: device, DDP (torchrun or SLURM srun), seeds, autocast, rank-0 printing."""
from __future__ import annotations

import contextlib
import os
import random
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from medgen.common.errors import UserError


@dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def any_true(self, flag: bool) -> bool:
        """True on every rank if flag is true on any rank (one collective, every rank takes part; reads back)."""
        value = torch.tensor([float(flag)], device=self.device)
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device, torch.float64).clone()
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world
        return value


def _env_ranks(env) -> tuple[int, int, int]:
    """(rank, local_rank, world) from torchrun (RANK/LOCAL_RANK/WORLD_SIZE) or SLURM srun (global ids)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def _slurm_master(env) -> None:
    if "MASTER_ADDR" not in env:
        host = "127.0.0.1"
        nodes = env.get("SLURM_JOB_NODELIST")
        if nodes:
            try:
                host = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                      check=True).stdout.split()[0]
            except (OSError, subprocess.CalledProcessError, IndexError):
                pass
        os.environ["MASTER_ADDR"] = host
    os.environ.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", 0)) % 1000))


def init_runtime(rt_cfg, env=None) -> Runtime:
    env = os.environ if env is None else env
    rank, local_rank, world = _env_ranks(env) if rt_cfg.multi_gpu else (0, 0, 1)
    want_cuda = rt_cfg.device == "cuda" or (rt_cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("runtime.device=cuda but no CUDA device is visible")
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        _slurm_master(env)
        dist.init_process_group("nccl" if want_cuda else "gloo", rank=rank, world_size=world)
    precision = rt_cfg.precision if rt_cfg.precision != "auto" else ("bf16" if want_cuda else "fp32")
    # each rank its own stream of noise and times; the data order uses the shared seed instead
    seed = rt_cfg.seed * world + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return Runtime(rank, local_rank, world, device, torch.bfloat16 if precision == "bf16" else None)


def local_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """One process on `device` (auto: CUDA when there is one; bf16 autocast there), leaving the global seeds
    alone: for the Python API, whose samples draw from their own generators."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got {device!r}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA device is visible")
    bf16 = precision == "bf16" or (precision == "auto" and cuda)
    return Runtime(device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
                   autocast_dtype=torch.bfloat16 if bf16 else None)


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
