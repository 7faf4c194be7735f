"""Fast samplers against diffusers (the test reference): DPM-Solver++(2M) for epsilon and v prediction, and
the flow-matching Euler and Heun schedulers with a timestep shift; and schedule-consistency properties that
no public library pins: the flow grid covers exactly [0, 1], training and sampling use the same shift (2D and
3D), grids are reproducible."""
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from medgen.Generation.TrainGen.core.config import build_config
from medgen.Generation.TrainGen.core.samplers import SAMPLERS, nfe
from medgen.Generation.TrainGen.core.strategies import STRATEGIES
from medgen.Generation.TrainGen.core.strategies.rflow import resolution_shift

T = 1000


def make(name, shape=None, **kw):
    st = STRATEGIES[name](build_config({"strategy": {"name": name, "num_timesteps": T, **kw}}).strategy)
    return st.bind_shape(shape) if shape else st


class TinyNet(torch.nn.Module):
    """A fixed nonlinear function of (x, t): a stand-in network that both loops call identically."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.3, requires_grad=False)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return torch.tanh(x @ self.w.double()) * (1 + t / T) - 0.1 * x


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [5, 20])
def test_dpmpp_2m_matches_diffusers(prediction, steps):
    st = make("ddpm", ddpm={"prediction": prediction, "clip_sample": False})   # diffusers' DPM-Solver does not clip
    net = TinyNet()
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=(1 - st.alphas_cumprod / torch.cat(
        [torch.ones(1, dtype=torch.float64), st.alphas_cumprod[:-1]])).numpy(),
        prediction_type="epsilon" if prediction == "epsilon" else "v_prediction", algorithm_type="dpmsolver++",
        solver_order=2, final_sigmas_type="zero", timestep_spacing="linspace")
    ref.set_timesteps(steps)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = x.clone()
    for k in ref.timesteps:
        want = ref.step(net(want, k.item()), k, want).prev_sample
    grid = st.timesteps(steps, "dpmpp_2m")
    assert [round(t * T) - 1 for t, _ in grid] == ref.timesteps.tolist()   # the same time grid
    got, state = x.clone(), {}
    for t, t_next in grid:
        got = SAMPLERS["dpmpp_2m"](st, net(got, st.net_time(torch.tensor([t]))), got, t, t_next, None, state)
    scale = float(want.abs().max())     # diffusers keeps its schedule in float32: agreement to ~1e-7 of the scale
    assert torch.allclose(got, want, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("sampler,ref_cls", [("euler", FlowMatchEulerDiscreteScheduler),
                                             ("heun", FlowMatchHeunDiscreteScheduler)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_samplers_match_diffusers(sampler, ref_cls, shift):
    """diffusers' flow convention: x_sigma = (1 - sigma) x0 + sigma noise, output = noise - x0 (minus ours)."""
    st = make("rflow", rflow={"shift": shift})
    net = TinyNet()
    ref = ref_cls(num_train_timesteps=T, shift=shift)
    ref.set_timesteps(8)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want, calls = x.clone(), 0
    for k in ref.timesteps:
        want = ref.step(-net(want, k.item()), k, want).prev_sample
        calls += 1
    sigmas = ref.sigmas.double().unique_consecutive().tolist()            # the distinct grid, ending at 0
    model = lambda x_in, t: net(x_in, t * T)  # noqa: E731 - our time value: t * num_timesteps
    got, state, ours = x.clone(), {"model": None}, [0]

    def counted(x_in, t):
        ours[0] += 1
        return model(x_in, t)
    state["model"] = counted
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        ours[0] += 1
        got = SAMPLERS[sampler](st, model(got, t), got, t, t_next, None, state)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    assert ours[0] == calls == nfe(sampler, len(sigmas) - 1)


@pytest.mark.parametrize("shift", [1.0, 2.5])
@pytest.mark.parametrize("steps", [1, 7, 30, 1000])
def test_flow_grid_covers_exactly_the_unit_interval(shift, steps):
    st = make("rflow", rflow={"shift": shift})
    grid = st.timesteps(steps, "euler")
    assert grid[0][0] == 1.0 and grid[-1][1] == 0.0 and len(grid) == steps
    assert math.fsum(t - t_next for t, t_next in grid) == pytest.approx(1.0, abs=1e-12)
    assert all(t > t_next for t, t_next in grid)
    assert grid == st.timesteps(steps, "euler")                            # the same grid when built again
    assert make("ddpm").timesteps(steps if steps < T else T, "dpmpp_2m") == \
        make("ddpm").timesteps(steps if steps < T else T, "dpmpp_2m")


@pytest.mark.parametrize("shape,expected", [((128, 128), 2.0), ((128, 128, 96), 6 ** (1 / 3)), ((64, 64), 1.0)])
def test_training_and_sampling_use_the_same_shift(shape, expected):
    """The trainer and the generator bind the same data shape; the shift of training times equals the grid's."""
    st = make("rflow", shape=shape, rflow={"shift_base": 64})
    assert st.shift == pytest.approx(expected) == resolution_shift(1.0, 64, shape)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    times = st.sample_times(1000, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(times, st.warp(u))                               # training: the warp of uniform times
    grid = torch.tensor([t for t, _ in st.timesteps(10, "euler")] + [0.0], dtype=torch.float64)
    assert torch.allclose(grid, st.warp(torch.linspace(1, 0, 11, dtype=torch.float64)))
    if expected > 1:
        assert times.median() > 0.5                                        # more training time at high noise


def test_sampling_loop_uses_the_new_samplers_end_to_end():
    """sample() hands Heun the network through its state and counts 2n - 1 evaluations."""
    from medgen.Generation.TrainGen.core.sampling import sample

    class Mode:
        calls = 0

        def forward(self, model, x, t, cond, guidance):
            Mode.calls += 1
            return -x / (t[:, None, None, None] / T)                        # v = x0 - noise = -x_t / t for x0 = 0
    st = make("rflow")
    out = sample(None, st, Mode(), {}, torch.randn(2, 1, 4, 4), sampler="heun", num_steps=6)
    assert Mode.calls == nfe("heun", 6) == 11
    assert out.abs().max() < 1e-6


def test_nfe_benchmark_suite_runs_on_cpu(tmp_path):
    """bench/benchmark.py --suite nfe at a CI size: every sampler row has its NFE, wall time and an offline
    quality figure, and the plot is written."""
    from bench.benchmark import bench_nfe, plot_nfe
    grid = {"ddpm": (("ddim", 4), ("dpmpp_2m", 4)), "rflow": (("euler", 4), ("heun", 2))}
    rows = bench_nfe("cpu", "ci", tmp_path, epochs=1, n_samples=8, grid=grid)
    assert [r["metric"] for r in rows] == ["ddpm ddim-4", "ddpm dpmpp_2m-4", "rflow euler-4", "rflow heun-2"]
    assert [r["nfe"] for r in rows] == [4, 4, 4, 3]
    assert all(r["value"] >= 0 and r["seconds"] > 0 and r["w1"] >= 0 for r in rows)
    assert plot_nfe(rows, tmp_path / "nfe.png").stat().st_size > 0
