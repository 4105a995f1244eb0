"""Noise schedules and timestep spacings, checked against the conventions every other module relies on
(t = 0 is data, t = T-1 is noise, t = -1 is the clean data). The comparisons with diffusers are in
tests/peer/test_schedules_vs_diffusers.py."""
from __future__ import annotations

import pytest
import torch

from difflo import schedules
from difflo.diffusion import DiscreteSchedule

T = 1000


# --------------------------------------------------------------------------- betas / alpha_bar
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
    # timestep -1 (and would index alphas_cumprod[-1], pure noise, there). difflo keeps the first 61
    # (equal to diffusers' first 61: tests/peer/test_schedules_vs_diffusers.py).
    ts = schedules.timesteps(T, 61, "trailing")
    assert ts.shape == (61,) and ts.min().item() >= 0, ts[-3:]


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_discrete_schedule_sampling_times_end_at_the_clean_data(spacing):
    """A sampler's grid is the n timesteps of the spacing (diffusers' set_timesteps), then t_clean = -1."""
    path = DiscreteSchedule.from_name("linear")
    for n in (1, 7, 10, T):
        ts = path.sampling_times(n, spacing)
        assert ts == schedules.timesteps(T, n, spacing).tolist() + [path.t_clean] and path.t_clean == -1
        assert all(isinstance(t, int) for t in ts)
    assert path.sampling_times(10) == path.sampling_times(10, "trailing")


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
