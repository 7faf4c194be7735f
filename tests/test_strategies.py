"""Properties of every registered strategy, and numerics against MONAI's schedulers."""
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from medgen.Generation.TrainGen.core.config import build_config
from medgen.Generation.TrainGen.core.losses import min_snr_weight
from medgen.Generation.TrainGen.core.samplers import SAMPLERS
from medgen.Generation.TrainGen.core.strategies import STRATEGIES
from medgen.Generation.TrainGen.core.strategies.base import expand

VARIANTS = [("ddpm", {"ddpm": {"prediction": "epsilon"}}),
            ("ddpm", {"ddpm": {"prediction": "v", "schedule": "cosine"}}),
            ("rflow", {}), ("rflow", {"rflow": {"time_sampling": "logit-normal"}}),
            ("rflow", {"rflow": {"shift": 3.0}})]
IDS = ["ddpm-eps", "ddpm-v-cosine", "rflow", "rflow-logitnormal", "rflow-shift3"]


def make(name, **kw):
    return STRATEGIES[name](build_config({"strategy": {"name": name, "num_timesteps": 100, **kw}}).strategy)


def oracle(strategy, x0, x_t, t):
    """The exact prediction for x_t given the true x0."""
    a, s = (expand(c, x0) for c in strategy.coefficients(t))
    noise = (x_t - a * x0) / s
    return strategy.target(x0, noise, t)


def test_registry_covers_both():
    assert set(STRATEGIES) >= {"ddpm", "rflow"}


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 1, 4, 8, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_clean_at_t0_and_snr_falls(name, kw, shape):
    st = make(name, **kw).bind_shape(shape[2:])
    x0, noise = torch.rand(*shape) * 2 - 1, torch.randn(*shape)
    x_t, _ = st.corrupt(x0, noise, torch.zeros(2))           # one time domain: t = 0 is clean for all
    assert torch.equal(x_t, x0)
    t_first = st.sample_times(4096, torch.Generator().manual_seed(0), "cpu").min()
    a1, s1 = (float(c) for c in st.coefficients(t_first[None]))
    assert s1 < 0.05 and a1 > 0.95                           # the least noisy training time is nearly clean
    ts = torch.linspace(0.02, 0.98, 20)
    snr = st.snr(ts)
    assert torch.all(snr[1:] < snr[:-1])
    times = st.sample_times(1000, torch.Generator().manual_seed(1), "cpu")
    assert 0 < times.min() and times.max() <= 1


def test_rflow_at_T_is_noise():
    st = make("rflow")
    x0, noise = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    x_t, target = st.corrupt(x0, noise, torch.full((2,), 1.0))
    assert torch.equal(x_t, noise) and torch.allclose(target, x0 - noise)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 1, 4, 8, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_sampler_with_oracle_recovers_clean_sample(name, kw, shape):
    st = make(name, **kw).bind_shape(shape[2:])
    x0 = torch.rand(*shape) * 1.8 - 0.9
    for sampler in st.samplers:
        for steps in (st.num_timesteps, 7):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            gen = torch.Generator().manual_seed(1)
            grid = st.timesteps(steps, sampler)
            assert grid[0][0] == 1.0 and grid[-1][1] == 0.0   # from pure noise to clean
            state = {"model": lambda x_in, t_in: oracle(st, x0, x_in, torch.full((2,), t_in, dtype=torch.float64))}
            for t, t_next in grid:
                tt = torch.full((2,), t, dtype=torch.float64)
                x = SAMPLERS[sampler](st, oracle(st, x0, x, tt), x, t, t_next, gen, state)
            assert torch.allclose(x, x0, atol=1e-4), (sampler, steps)


def test_ddpm_matches_monai_add_noise_and_steps():
    for pred in ("epsilon", "v_prediction"):
        st = make("ddpm", ddpm={"prediction": "v" if pred == "v_prediction" else "epsilon"})
        x0, noise = torch.rand(3, 1, 8, 8) - 0.5, torch.randn(3, 1, 8, 8)
        k = torch.tensor([0, 50, 99])
        t = (k + 1) / 100                                    # DDPM's integer steps in the shared time domain
        assert torch.equal(st.net_time(t), k.float())
        ref = DDPMScheduler(100, prediction_type=pred)
        x_t, target = st.corrupt(x0, noise, t)
        assert torch.allclose(x_t, ref.add_noise(x0, noise, k), atol=1e-5)
        if pred == "v_prediction":
            assert torch.allclose(target, ref.get_velocity(x0, noise, k), atol=1e-5)
        # a near-oracle prediction keeps the predicted x0 inside [-1, 1]: MONAI's DDIM keeps the unclipped
        # epsilon after clipping x0 while ours recomputes it from the clipped x0; they agree when nothing clips
        model_out = st.target(x0, noise, t) + 0.01 * torch.randn(3, 1, 8, 8)
        x_t = x_t[1:2].expand(3, -1, -1, -1).contiguous()
        model_out = model_out[1:2].expand(3, -1, -1, -1).contiguous()
        for step_t in (60, 1):  # ancestral step t -> t-1 with the same noise draw
            ref.set_timesteps(100)
            want, _ = ref.step(model_out, step_t, x_t, generator=torch.Generator().manual_seed(3))
            got = SAMPLERS["ddpm"](st, model_out, x_t, (step_t + 1) / 100, step_t / 100,
                                   torch.Generator().manual_seed(3))
            assert torch.allclose(got, want, atol=1e-4)
        ddim = DDIMScheduler(100, prediction_type=pred)
        ddim.set_timesteps(10)
        want, _ = ddim.step(model_out, 60, x_t)
        got = SAMPLERS["ddim"](st, model_out, x_t, 61 / 100, 51 / 100)
        assert torch.allclose(got, want, atol=1e-4)


def test_rflow_matches_monai():
    st = make("rflow")
    ref = RFlowScheduler(num_train_timesteps=100, use_discrete_timesteps=False)
    x0, noise = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t, _ = st.corrupt(x0, noise, t)
    assert torch.allclose(x_t, ref.add_noise(x0, noise, t * 100), atol=1e-6)
    assert torch.allclose(st.net_time(t), t * 100)               # the network sees MONAI's time scale
    v = torch.randn(3, 1, 8, 8)
    ref.set_timesteps(10, input_img_size_numel=64)
    want, _ = ref.step(v, torch.tensor(90.0), x_t, torch.tensor(80.0))
    assert torch.allclose(SAMPLERS["euler"](st, v, x_t, 0.9, 0.8), want, atol=1e-6)


# Min-SNR-gamma (Hang et al. 2023): every prediction type against the closed form
@pytest.mark.parametrize("snr", [0.01, 0.5, 1.0, 4.99, 5.0, 20.0, 1e4])
def test_min_snr_weights(snr):
    s, g = torch.tensor([snr], dtype=torch.float64), 5.0
    m = min(snr, g)
    assert min_snr_weight(s, g, "epsilon").item() == pytest.approx(m / snr)
    assert min_snr_weight(s, g, "v").item() == pytest.approx(m / (snr + 1))
    assert min_snr_weight(s, g, "sample").item() == pytest.approx(m)
    t = 1 / (1 + snr ** 0.5)  # rectified flow: SNR = ((1-t)/t)^2
    assert min_snr_weight(s, g, "velocity").item() == pytest.approx(m * t ** 2)


def test_min_snr_velocity_equals_x0_weighting_through_the_strategy():
    """For rflow, w * ||v err||^2 must equal min(SNR, g) * ||x0 err||^2 for the same prediction error."""
    st = make("rflow")
    t = torch.tensor([0.05, 0.30, 0.70, 0.99])
    x0, noise, v_err = torch.rand(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    x_t, v = st.corrupt(x0, noise, t)
    x0_err = st.predict_x0(v + v_err, x_t, t) - x0
    snr = st.snr(t)
    lhs = min_snr_weight(snr, 5.0, "velocity") * v_err.double().square().flatten(1).sum(1)
    rhs = snr.clamp(max=5.0) * x0_err.double().square().flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-4)


def test_min_snr_epsilon_at_zero_snr_is_one():
    assert min_snr_weight(torch.tensor([0.0]), 5.0, "epsilon").item() == 1.0
