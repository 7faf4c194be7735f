"""What the speed claims rest on, checked on a CPU: no host-device copy inside a training or sampling step after
the first, torch.compile without graph breaks or recompiles (dynamo + AOT autograd, the CPU stand-in for a GPU
build), output written beside sampling with errors surfacing, the auto batch size's throughput plateau, float32
MS-SSIM against float64, GPU peaks by exact name, and the test harness's own timeout."""
from __future__ import annotations

import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medgen.Generation.TrainGen.core.config import build_config
from medgen.Generation.TrainGen.core.samplers import SAMPLERS
from medgen.Generation.TrainGen.core.strategies import STRATEGIES


class CrossDeviceCopies(TorchDispatchMode):
    """Counts tensor copies between devices (what a host-device sync is made of on CUDA)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src, dst = (args[0], out) if func is torch.ops.aten._to_copy.default else (args[1], args[0])
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                self.n += 1
        return out


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_training_and_sampling_steps_copy_nothing_between_devices_after_the_first(name):
    """The batch lives on another device than the schedule (the meta device stands in for a GPU): the DDPM
    table is copied there once, then every corrupt / SNR / target / x0 / sampler step stays on the device."""
    st = STRATEGIES[name](build_config({"strategy": {"name": name}}).strategy).bind_shape((8, 8))
    dev = torch.device("meta")
    x0 = torch.empty(4, 1, 8, 8, device=dev)

    def steps():
        t = st.sample_times(4, None, dev)
        x_t, target = st.corrupt(x0, torch.empty_like(x0), t)
        st.snr(t)
        st.net_time(t)
        st.predict_x0(target, x_t, t)
        for sampler in st.samplers:
            state = {"model": lambda x, tn: torch.empty_like(x)}
            for t_, t_next in st.timesteps(3, sampler):
                SAMPLERS[sampler](st, torch.empty_like(x0), x_t, t_, t_next, None, state)
    first = CrossDeviceCopies()
    with first:
        steps()
    later = CrossDeviceCopies()
    with later:
        steps()
        steps()
    assert first.n <= 1 and later.n == 0, (first.n, later.n)


def _graphs() -> tuple[dict, int]:
    from torch._dynamo.utils import counters
    return dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def _fresh_dynamo() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("strategy,dims", [("ddpm", 2), ("rflow", 3)])
def test_compiled_training_has_no_graph_break_and_no_recompile(demo_root, tmp_path, strategy, dims):
    """torch.compile (dynamo + AOT autograd) of the trainer's network: one graph for every training step,
    unchanged by a validation pass in between and by a resume into a fresh trainer."""
    from tests.test_training import dims_sections, make_trainer, tiny_cfg
    _fresh_dynamo()
    cfg = tiny_cfg(demo_root, tmp_path, "bravo", strategy, runtime={"compile": True, "compile_backend": "aot_eager"},
                   **dims_sections(dims))
    tr = make_trainer(cfg, tmp_path / "run")
    order = tr.train_data.batch_indices(cfg.optim.batch_size, 0, 0)
    for k in range(2):
        tr.train_step([tr.train_data.batch(order[k])])
    breaks, graphs = _graphs()
    assert breaks == {} and graphs == 1, (breaks, graphs)
    tr.validate()
    tr.train_step([tr.train_data.batch(order[2 % len(order)])])
    assert _graphs() == ({}, 1)                                       # validation did not recompile the step
    tr.checkpoint(False)
    again = make_trainer(cfg, tmp_path / "run")
    again.resume(tmp_path / "run")
    again.train_step([again.train_data.batch(order[0])])
    breaks, graphs = _graphs()
    assert breaks == {} and graphs <= 2                               # its own compile, nothing more


@pytest.mark.parametrize("strategy,shape", [("rflow", (8, 8)), ("ddpm", (4, 8, 8))])
def test_compiled_sampling_is_one_graph_for_every_step(strategy, shape):
    from medgen.Generation.TrainGen.core.generation.models import BatchInvariant
    from medgen.Generation.TrainGen.core.network import build_unet
    from medgen.Generation.TrainGen.core.sampling import sample
    from medgen.Generation.TrainGen.core.parts import build_parts
    _fresh_dynamo()
    cfg = build_config({"model": {"preset": "tiny"}, "strategy": {"name": strategy},
                        "mode": {"name": "bravo"}, "data": {"image_size": 8, "spatial_dims": len(shape),
                                                             "volume_shape": [8, 8, 4]}})
    st, mode = build_parts(cfg, None, None)
    net = BatchInvariant(build_unet(cfg.model, mode.in_channels, mode.out_channels,
                                    spatial_dims=len(shape)).eval())
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True, dynamic=False)   # fullgraph: no breaks
    cond = {"concat": torch.zeros(2, 1, *shape)}
    with torch.no_grad():
        for steps in (2, 3):
            sample(compiled, st, mode, cond, torch.randn(2, 1, *shape), st.default_sampler, steps)
    assert _graphs() == ({}, 1)


# ---------------------------------------------------------------- writing, auto batch, metrics, harness
def test_a_failed_write_surfaces_in_the_main_loop(tmp_path, monkeypatch):
    from medgen.Generation.TrainGen.core import generate as G
    calls = []

    def failing(job, i, arrays, row):
        calls.append(i)
        raise OSError("disk full")
    monkeypatch.setattr(G, "write_sample", failing)     # our own function, not torch's: a failing disk
    with pytest.raises(OSError, match="disk full"):
        with G.SampleWriter(None) as writer:
            for batch in range(4):
                writer.put({batch: {"arrays": {}, "row": {}}})
    assert calls and len(calls) <= 4


def test_auto_batch_stops_where_throughput_stops_growing():
    from medgen.Generation.TrainGen.core.autobatch import plateau_batch
    assert plateau_batch({8: 100.0, 16: 180.0, 32: 300.0, 64: 310.0, 128: 312.0}) == 32
    assert plateau_batch({8: 100.0, 16: 200.0}) == 16


def test_ms_ssim_in_float32_matches_float64():
    from medgen.eval.obj_eval.core import metrics as M
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 64, 64, generator=g)
    y = (x + 0.1 * torch.randn(4, 1, 64, 64, generator=g)).clamp(0, 1)
    assert torch.allclose(M.ms_ssim(x, y), M.ms_ssim(x, y, dtype=torch.float64), atol=1e-5)


def test_gpu_peaks_by_exact_name():
    from bench.benchmark import peak_bf16
    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989e12 and peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16("NVIDIA H100 NVL") == 835e12 and peak_bf16("NVIDIA H200") == 989e12
    assert peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12 and peak_bf16("Tesla V100") is None


def test_run_script_honours_its_timeout(tmp_path):
    from tests.conftest import ScriptTimeout, run_script
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(30)\n")
    t0 = time.perf_counter()
    with pytest.raises(ScriptTimeout):
        run_script(str(slow), timeout=1)
    assert time.perf_counter() - t0 < 5
