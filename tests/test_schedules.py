"""Noise schedules and timestep spacings, checked against diffusers and against the conventions
every other module relies on (t = 0 is data, t = T-1 is noise, t = -1 is the clean data)."""
from __future__ import annotations

import pytest
import torch

from difflo import schedules
from difflo.diffusion import DiscreteSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


# --------------------------------------------------------------------------- betas / alpha_bar
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_betas_and_alphas_cumprod_match_diffusers(name):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name])
    betas = schedules.get_betas(name, T)
    ac = schedules.alphas_cumprod(betas)
    assert betas.dtype == ac.dtype == torch.float64
    assert betas.shape == ac.shape == (T,)
    # diffusers keeps float32 (its cumprod also runs in float32): compare in float32.
    torch.testing.assert_close(betas.float(), ref.betas, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ac.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_linear_betas_endpoints():
    b = schedules.linear_betas(T)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.all(b[1:] > b[:-1])


def test_cosine_betas_are_capped():
    b = schedules.cosine_betas(T)
    assert b.max().item() == pytest.approx(0.999)       # the last beta hits the cap
    assert torch.all(b > 0) and torch.all(b <= 0.999)


def test_sigmoid_schedule_properties():
    betas = schedules.get_betas("sigmoid", T)
    ac = schedules.alphas_cumprod(betas)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert torch.all(betas > 0) and torch.all(betas <= 0.999)
    assert torch.all(ac > 0) and torch.all(ac < 1)
    assert torch.all(ac[1:] < ac[:-1]), "alphas_cumprod must be strictly decreasing"
    assert ac[0].item() > 0.999          # starts near 1 (data)
    assert ac[-1].item() < 1e-5          # ends near 0 (noise)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError):
        schedules.get_betas("quadratic", T)
    with pytest.raises(ValueError):
        DiscreteSchedule.from_name("nope")


# --------------------------------------------------------------------------- conventions / snr
@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_snr_decreasing_and_time_direction(name):
    ac = schedules.alphas_cumprod(schedules.get_betas(name, T))
    snr = schedules.snr(ac)
    assert torch.all(snr[1:] < snr[:-1]), "SNR must decrease with t"
    torch.testing.assert_close(snr, ac / (1 - ac))
    # t = 0 is (almost) data, t = T-1 (almost) pure noise.
    assert ac[0].item() > 0.999
    assert ac[-1].item() < 1e-4
    assert snr[0].item() > 1e3 and snr[-1].item() < 1e-4


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_discrete_schedule_alpha_sigma(name):
    path = DiscreteSchedule.from_name(name)
    assert path.T == T
    # t = -1 is the clean data itself.
    a, s = path.alpha_sigma(-1)
    assert (a, s) == (1.0, 0.0)
    assert isinstance(a, float) and isinstance(s, float)
    assert path.alpha_bar(-1) == 1.0
    # int t: floats with alpha^2 + sigma^2 = 1, alpha = sqrt(alpha_bar)
    for t in (0, 1, 500, T - 1):
        a, s = path.alpha_sigma(t)
        assert a == pytest.approx(path.alphas_cumprod[t].item() ** 0.5, rel=1e-12)
        assert a * a + s * s == pytest.approx(1.0, abs=1e-12)
    # tensor t (including -1): float64 tensors, same values as the int path
    tt = torch.tensor([-1, 0, 1, 500, T - 1])
    a, s = path.alpha_sigma(tt)
    assert a.dtype == s.dtype == torch.float64 and a.shape == (5,)
    assert a[0].item() == 1.0 and s[0].item() == 0.0
    for k, t in enumerate(tt.tolist()):
        ai, si = path.alpha_sigma(int(t))
        assert a[k].item() == pytest.approx(ai, rel=1e-12)
        assert s[k].item() == pytest.approx(si, rel=1e-12, abs=1e-15)
    # model_time: the index itself, as float32
    mt = path.model_time(torch.tensor([0, 7, 999]))
    assert mt.dtype == torch.float32 and mt.tolist() == [0.0, 7.0, 999.0]


# --------------------------------------------------------------------------- timesteps
SPACING_CASES = [(sp, n) for sp in schedules.SPACINGS for n in (1, 7, 10, 50, 100, 999, 1000)]


@pytest.mark.parametrize("spacing,n", SPACING_CASES)
def test_timesteps_match_diffusers(spacing, n):
    ts = schedules.timesteps(T, n, spacing)
    assert ts.dtype == torch.int64 and ts.shape == (n,)
    for cls in (DDIMScheduler, DDPMScheduler):
        ref = cls(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert torch.equal(ts, ref.timesteps.to(torch.int64)), (cls.__name__, ts[:8], ref.timesteps[:8])


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_timesteps_well_formed_for_every_n(spacing):
    """For every n in 1..T: n distinct decreasing timesteps in [0, T-1]."""
    for n in range(1, T + 1):
        ts = schedules.timesteps(T, n, spacing)
        assert ts.shape == (n,), (spacing, n)
        assert ts.min().item() >= 0 and ts.max().item() <= T - 1, (spacing, n)
        assert torch.all(ts[1:] < ts[:-1]), (spacing, n)
        if spacing == "trailing" or (spacing == "linspace" and n > 1):
            assert ts[0].item() == T - 1, (spacing, n)      # they start at pure noise
        if spacing in ("leading", "linspace"):
            assert ts[-1].item() == 0, (spacing, n)         # they end at t = 0


def test_linspace_single_step_is_t0():
    # diffusers' definition, kept by difflo: linspace(0, T-1, 1) = [0], so a 1-step "linspace" sampler
    # starts from t = 0 (data), not from noise. Pinned so that a change is noticed.
    assert schedules.timesteps(T, 1, "linspace").tolist() == [0]


def test_trailing_n61_has_61_nonnegative_steps():
    # float64 arange(1000, 0, -1000/61) keeps a 62nd element ~1e-13, which diffusers turns into a
    # timestep -1 (and would index alphas_cumprod[-1], pure noise, there). difflo keeps the first 61;
    # they equal diffusers' first 61.
    ts = schedules.timesteps(T, 61, "trailing")
    assert ts.shape == (61,) and ts.min().item() >= 0, ts[-3:]
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert ref.timesteps.shape == (62,) and ref.timesteps[-1].item() == -1
    assert torch.equal(ts, ref.timesteps[:61])


def test_timesteps_known_values():
    assert schedules.timesteps(T, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert schedules.timesteps(T, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert schedules.timesteps(T, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert schedules.timesteps(T, 10, "leading", offset=1).tolist()[0] == 901
    assert schedules.timesteps(T, T, "trailing").tolist() == list(range(T - 1, -1, -1))


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("n", [0, -3, T + 1])
def test_timesteps_invalid_n_raises(spacing, n):
    with pytest.raises(ValueError):
        schedules.timesteps(T, n, spacing)


def test_timesteps_unknown_spacing_raises():
    with pytest.raises(ValueError):
        schedules.timesteps(T, 10, "quadratic")


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_timesteps_match_diffusers_for_every_n(spacing):
    """Every n in 1..T, .5 rounding ties included (e.g. trailing n=48, linspace n=27); for trailing, the
    62 values of n where diffusers appends a -1 are compared on diffusers' first n entries."""
    for n in range(1, T + 1):
        ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert torch.equal(schedules.timesteps(T, n, spacing), ref.timesteps[:n]), (spacing, n)
