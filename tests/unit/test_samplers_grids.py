"""Time grids with fractional timesteps (sample.spacing karras / exponential), zero terminal SNR as a schedule
option and offset noise as a training option: the checks that need no diffusers (the comparisons with diffusers
are in tests/peer/test_schedules_vs_diffusers.py and tests/peer/test_samplers_vs_diffusers.py)."""
from __future__ import annotations

import math

import pytest
import torch

from difflo import config as config_mod
from difflo import schedules
from difflo.diffusion import DiscreteSchedule, training_loss, training_noise
from difflo.errors import ConfigError
from difflo.flow import FlowPath
from difflo.guidance import ModelDenoiser
from samplers_common import T, path_for, ztsnr_path


def _nsr(path, t):
    a, s = path.alpha_sigma(t)
    return s / a


# --------------------------------------------------------------------------- Karras and exponential grids
@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("spacing", schedules.SIGMA_SPACINGS)
def test_sigma_grid_is_well_formed_for_every_n(name, spacing):
    """For every n in 1..T: n decreasing times from T-1 to 0 (n = 1: just T-1), then the clean end -1."""
    path = path_for(name) if name != "sigmoid" else DiscreteSchedule.from_name("sigmoid", T)
    for n in range(1, T + 1):
        ts = path.sampling_times(n, spacing)
        assert len(ts) == n + 1 and ts[0] == T - 1 and ts[-1] == -1, (n, ts[:3])
        assert all(a > b for a, b in zip(ts, ts[1:])), n
        if n > 1:
            assert ts[-2] == 0, n


@pytest.mark.parametrize("spacing", schedules.SIGMA_SPACINGS)
def test_sigma_grid_noise_levels(spacing):
    """The grid's noise levels sigma/alpha at its times are Karras et al.'s Eq. 5 (rho = 7) / a geometric
    sequence between sigma(0) and sigma(T-1), to 1e-12 relative."""
    path = path_for("linear")
    n = 12
    ts = path.sampling_times(n, spacing)
    got = torch.tensor([_nsr(path, t) for t in ts[:-1]], dtype=torch.float64)
    lo, hi = _nsr(path, 0), _nsr(path, T - 1)
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    want = (hi ** (1 / 7) + i * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7 if spacing == "karras" else \
        torch.exp(math.log(hi) + i * (math.log(lo) - math.log(hi)))
    torch.testing.assert_close(got, want, atol=0, rtol=1e-12)
    assert _nsr(path, ts[-1]) == 0.0


def test_timestep_spacings_are_unchanged():
    """The timestep spacings still give integer grids (the noise-level ones are the only fractional ones)."""
    path = path_for("cosine")
    for spacing in schedules.SPACINGS:
        ts = path.sampling_times(10, spacing)
        assert all(isinstance(t, int) for t in ts) and ts == schedules.timesteps(T, 10, spacing).tolist() + [-1]


def test_fractional_time_reaches_the_network_and_the_path():
    """A fractional t goes to the network as it is (model_time) and to alpha_sigma by interpolation; tensor
    times work the same; an integer-valued float is the integer timestep."""
    path = path_for("cosine")
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            seen.append(t.clone())
            return torch.zeros_like(x)

    x = torch.ones(2, 1, 2, 2)
    ModelDenoiser(Net(), path, "v")(x, 457.25)
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [457.25, 457.25]
    a, s = path.alpha_sigma(457.25)
    a0, s0 = path.alpha_sigma(457)
    a1, s1 = path.alpha_sigma(458)
    assert a1 < a < a0 and s0 < s < s1
    tensor_ab = path.alpha_bar(torch.tensor([457.25, 457.0, -1.0], dtype=torch.float64))
    assert tensor_ab.tolist() == pytest.approx([a * a, a0 * a0, 1.0], rel=1e-12)
    assert path.alpha_bar(457.0) == path.alpha_bar(457)
    with pytest.raises(ValueError, match="outside"):
        path.alpha_sigma(999.5)


def test_time_at_nsr_inverts_both_paths():
    for path, ts in [(path_for("linear"), [0.0, 3.5, 500.0, 998.25, 999.0]), (FlowPath(), [0.1, 0.5, 0.9])]:
        for t in ts:
            assert abs(path.time_at_nsr(_nsr(path, t)) - t) < 1e-9
    assert FlowPath().time_at_nsr(math.inf) == 1.0


def test_flow_refuses_sigma_spacings():
    with pytest.raises(ValueError, match="trailing or linspace"):
        FlowPath().sampling_times(10, "karras")
    assert FlowPath.spacings == ("trailing", "linspace")
    assert path_for("cosine").spacings == schedules.SPACING_CHOICES


# --------------------------------------------------------------------------- config: zero terminal SNR, churn
def _config(*overrides):
    cfg = config_mod.load(None, list(overrides))
    cfg.validate()
    return cfg


def test_zero_terminal_snr_config():
    """diffusion.zero_terminal_snr rescales the configured schedule; v (and x0) prediction only."""
    from difflo.noise_paths import make_path
    path = make_path(_config("diffusion.zero_terminal_snr=true").diffusion)
    assert path.alphas_cumprod[-1].item() == 0.0 and path.alphas_cumprod[0].item() > 0.99
    assert make_path(_config().diffusion).alphas_cumprod[-1].item() > 0
    _config("diffusion.zero_terminal_snr=true", "diffusion.prediction=x0")


@pytest.mark.parametrize("overrides,words", [
    (["diffusion.zero_terminal_snr=true", "diffusion.prediction=eps"], ["zero_terminal_snr", "prediction=v"]),
    (["diffusion.zero_terminal_snr=true", "diffusion.objective=flow", "diffusion.prediction=u",
      "sample.sampler=euler"], ["zero_terminal_snr", "objective diffusion"]),
    (["diffusion.zero_terminal_snr=true", "sample.spacing=karras"], ["sample.spacing=karras", "trailing"]),
    (["sample.spacing=karrass"], ["sample.spacing", "karras"]),
    (["sample.s_churn=-1"], ["sample.s_churn"]),
    (["sample.s_tmin=0.8", "sample.s_tmax=0.2"], ["s_tmin"]),
    (["train.offset_noise=-0.1"], ["train.offset_noise"]),
])
def test_bad_options_are_one_config_error_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        _config(*overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_new_options_round_trip_through_yaml():
    cfg = _config("diffusion.zero_terminal_snr=true", "train.offset_noise=0.1", "sample.spacing=linspace",
                  "sample.s_churn=3", "sample.s_noise=1.003")
    again = config_mod.from_dict(config_mod.yaml.safe_load(config_mod.dump(cfg)))
    assert again == cfg and again.sample.s_tmax == 1.0
    assert _config("sample.spacing=exponential").sample.spacing == "exponential"


# --------------------------------------------------------------------------- offset noise
def test_offset_noise():
    """offset_noise = 0 draws exactly what training drew before; k > 0 adds k times one N(0, 1) value per image
    and channel (drawn after the per-pixel noise), constant over the pixels."""
    x0 = torch.zeros(64, 3, 8, 8)
    plain = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(training_noise(x0, torch.Generator().manual_seed(1)), plain, atol=0, rtol=0)
    off = training_noise(x0, torch.Generator().manual_seed(1), 0.5)
    shift = off - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)   # constant per image and channel
    assert 0.4 < shift[:, :, 0, 0].std().item() < 0.6


@pytest.mark.parametrize("objective", ["diffusion", "flow"])
def test_offset_noise_reaches_the_loss(objective):
    from difflo.noise_paths import make_path
    over = ["diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler"] if objective == "flow" else []
    d = _config(*over).diffusion
    path = make_path(d)
    net = lambda x, t, y: x * 0.5
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = lambda k: path.training_loss(net, x0, None, d, torch.Generator().manual_seed(0), offset_noise=k)
    assert torch.equal(loss(0.0), loss(0.0)) and not torch.equal(loss(0.0), loss(0.3))


def test_zero_terminal_snr_trains_with_v():
    """The v-prediction loss is finite when t = T-1 is drawn (alpha = 0, snr = 0); min_snr weighting too."""
    path = ztsnr_path("cosine")
    net = lambda x, t, y: x * 0.1
    x0 = torch.rand(256, 1, 4, 4)
    for weighting in ("none", "min_snr"):
        loss = training_loss(net, x0, None, path, "v", weighting, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss)


# --------------------------------------------------------------------------- step rules, grid ends, leading's offset
def test_stride_rule_lands_t_minus_T_over_n():
    """step_rule stride (diffusers' DDIMScheduler): each step from t lands at t - T // n (the end below 0); the
    grid lists the times the network sees. It is a plain grid where that is the next listed time (leading
    always, trailing when n divides T) and a TimeGrid elsewhere."""
    from difflo.samplers import TimeGrid, _steps
    path = path_for("linear")
    for spacing, n in [("leading", 13), ("leading", 17), ("trailing", 10)]:
        listed = path.sampling_times(n, spacing)
        assert path.sampling_times(n, spacing, step_rule="stride") == listed
        assert type(path.sampling_times(n, spacing, step_rule="stride")) is list
    grid = path.sampling_times(13, "trailing", step_rule="stride")
    assert isinstance(grid, TimeGrid)
    assert grid[:3] == [999, 922, 845] and grid[-2:] == [76, 0]            # 76 - 1000 // 13 = 0: not the end
    assert [t_prev for _, _, t_prev in _steps(grid)][:3] == [923, 846, 769]
    assert all(t_prev == t - 76 for _, t, t_prev in _steps(grid))
    assert _steps(grid[2:5]) == [(0, 845, 769), (1, 768, 692)]            # a slice keeps its steps' landings
    lin = path.sampling_times(10, "linspace", step_rule="stride", end="t0")
    assert lin[:2] == [999, 888] and _steps(lin)[0] == (0, 999, 899) and _steps(lin)[-1] == (9, 0, 0)
    with pytest.raises(ValueError, match="step rule"):
        path.sampling_times(10, "trailing", step_rule="next")


def test_grid_end_and_leading_offset():
    path = path_for("linear")
    assert path.sampling_times(10, "leading")[-3:] == [100, 0, -1]
    assert path.sampling_times(10, "leading", end="t0")[-3:] == [100, 0, 0]     # 0 -> 0: DDIM's identity step
    assert path.sampling_times(10, "trailing", end="t0")[-2:] == [99, 0]
    assert path.sampling_times(10, "leading", offset=1)[:2] == [901, 801]
    assert path.sampling_times(10, "leading", offset=1)[-2:] == [1, -1]
    assert path.sampling_times(10, "trailing", offset=1)[0] == 999            # only leading has an offset
    with pytest.raises(ValueError, match="steps_offset 100 does not fit"):
        path.sampling_times(10, "leading", offset=100)
    with pytest.raises(ValueError, match="flow model"):
        FlowPath().sampling_times(10, "trailing", step_rule="stride")


def test_samplers_walk_a_time_grid_by_its_landings():
    """DDIM on a TimeGrid is the chain of DDIM steps t_i -> lands[i], the network seeing t_i; every sampler
    reports the landing as t_prev."""
    from difflo.samplers import SAMPLERS, SeededNoise, ddim_step
    path = path_for("cosine")
    grid = path.sampling_times(7, "trailing", step_rule="stride")

    class Den:
        def __init__(self):
            self.path, self.seen = path, []

        def __call__(self, x, t, **kw):
            self.seen.append(t)
            return torch.tanh(x) * 0.5 + 0.01 * math.cos(t)

    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    den, steps = Den(), []
    got = SAMPLERS["ddim"](den, x, grid, callback=lambda d: steps.append((d["t"], d["t_prev"])))
    assert den.seen == list(grid[:-1]) and [p for _, p in steps] == grid.lands
    want = x
    for t, t_prev in zip(grid[:-1], grid.lands):
        want = ddim_step(want, Den()(want, t), path, t, t_prev)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for name in ("ddpm", "dpmpp", "euler_ancestral"):
        seen = []
        SAMPLERS[name](Den(), x, grid, callback=lambda d: seen.append(d["t_prev"]),
                       noise=SeededNoise([1, 2], (1, 4, 4)))
        assert seen == grid.lands, name
