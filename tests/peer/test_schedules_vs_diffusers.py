"""Noise schedules and timestep spacings against diffusers' DDPMScheduler / DDIMScheduler. The checks
that need no diffusers are in tests/test_schedules.py."""
from __future__ import annotations

import math

import pytest
import torch

from difflo import schedules

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


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


SPACING_CASES = [(sp, n) for sp in schedules.SPACINGS for n in (1, 7, 10, 50, 100, 999, 1000)]


@pytest.mark.parametrize("spacing,n", SPACING_CASES)
def test_timesteps_match_diffusers(spacing, n):
    ts = schedules.timesteps(T, n, spacing)
    assert ts.dtype == torch.int64 and ts.shape == (n,)
    for cls in (DDIMScheduler, DDPMScheduler):
        ref = cls(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert torch.equal(ts, ref.timesteps.to(torch.int64)), (cls.__name__, ts[:8], ref.timesteps[:8])


def test_trailing_n61_matches_diffusers_first_61():
    # diffusers' float64 arange(1000, 0, -1000/61) keeps a 62nd element ~1e-13, which it turns into a
    # timestep -1; difflo's 61 timesteps equal diffusers' first 61.
    ts = schedules.timesteps(T, 61, "trailing")
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert ref.timesteps.shape == (62,) and ref.timesteps[-1].item() == -1
    assert torch.equal(ts, ref.timesteps[:61])


@pytest.mark.slow
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_timesteps_match_diffusers_for_every_n(spacing):
    """Every n in 1..T, .5 rounding ties included (e.g. trailing n=48, linspace n=27); for trailing, the
    62 values of n where diffusers appends a -1 are compared on diffusers' first n entries."""
    for n in range(1, T + 1):
        ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert torch.equal(schedules.timesteps(T, n, spacing), ref.timesteps[:n]), (spacing, n)


# --------------------------------------------------------------------------- noise-level grids (issue 19)
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler  # noqa: E402

from difflo.diffusion import DiscreteSchedule  # noqa: E402

SIGMA_CASES = [(name, sp, n) for name in ("linear", "cosine") for sp in schedules.SIGMA_SPACINGS
               for n in (2, 5, 10, 25, 50, 100, 999)]
USE = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}


def _nsr(path, t):
    a, s = path.alpha_sigma(t)
    return s / a


@pytest.mark.parametrize("name,spacing,n", SIGMA_CASES)
def test_sigma_grids_match_euler_discrete_scheduler(name, spacing, n):
    """difflo's noise-level grids (sample.spacing karras / exponential) are diffusers' EulerDiscreteScheduler(
    use_karras_sigmas / use_exponential_sigmas, timestep_spacing="linspace"): the same fractional timesteps
    (log-sigma interpolation, as diffusers' _sigma_to_t) and, at those timesteps, the same sigmas. Given
    difflo's float64 alpha_bar, diffusers' float32 timesteps are difflo's rounded to float32, bit for bit;
    stock diffusers (float32 alpha_bar) agrees within 0.1 of a timestep (measured 0.057, cosine near T-1, where
    log sigma changes fast). With linspace spacing diffusers' sigma range is the
    whole schedule's, sigma(0) .. sigma(T-1) (k-diffusion's sigma_min/max), as difflo's; other spacings would
    narrow it (their first/last timestep's sigma), and n = 1 gives linspace's single timestep 0."""
    path = DiscreteSchedule.from_name(name, T)
    ts = path.sampling_times(n, spacing)
    assert len(ts) == n + 1 and ts[0] == T - 1 and ts[-2] == 0 and ts[-1] == path.t_clean
    assert all(a > b for a, b in zip(ts, ts[1:]))
    kwargs = dict(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], timestep_spacing="linspace",
                  **{USE[spacing]: True})
    ref = EulerDiscreteScheduler(**kwargs)
    ref.alphas_cumprod = path.alphas_cumprod.clone()
    ref.set_timesteps(n)
    # equal as float32, but for the ends, which difflo snaps to T-1 and 0 exactly (diffusers: 9.5e-15 for 0)
    assert (torch.tensor(ts[:-1], dtype=torch.float64).float() - ref.timesteps).abs().max() < 1e-9
    ours = torch.tensor([_nsr(path, t) for t in ts[:-1]], dtype=torch.float64)
    torch.testing.assert_close(ours.float(), ref.sigmas[:-1], atol=0, rtol=2e-7)
    assert ref.sigmas[-1].item() == 0.0 == _nsr(path, path.t_clean)
    stock = EulerDiscreteScheduler(**kwargs)
    stock.set_timesteps(n)
    assert (stock.timesteps.double() - torch.tensor(ts[:-1], dtype=torch.float64)).abs().max() < 0.1


@pytest.mark.parametrize("name,spacing,n", SIGMA_CASES)
def test_sigma_grids_match_dpm_scheduler_sigmas(name, spacing, n):
    """DPMSolverMultistepScheduler(use_karras_sigmas / use_exponential_sigmas) has the same sigmas, but calls
    the network at integer timesteps: karras rounds difflo's fractional ones (except for squaredcos_cap_v2,
    where it keeps them and its int64 cast truncates them), exponential truncates them. difflo calls the
    network at the fractional timestep whose noise level the solver uses (as EulerDiscreteScheduler and
    k-diffusion do); the DPM chains agree when diffusers' network is given difflo's times
    (tests/peer/test_samplers_vs_diffusers.py::test_dpm_family_chain_matches_diffusers)."""
    path = DiscreteSchedule.from_name(name, T)
    ts = path.sampling_times(n, spacing)
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], **{USE[spacing]: True})
    ref.alphas_cumprod = path.alphas_cumprod.clone()
    ref.set_timesteps(n)
    ours = torch.tensor([_nsr(path, t) for t in ts], dtype=torch.float64)
    torch.testing.assert_close(ours.float(), ref.sigmas, atol=0, rtol=2e-7)
    frac = torch.tensor(ts[:-1], dtype=torch.float64)
    rounded = spacing == "karras" and name != "cosine"
    assert torch.equal(ref.timesteps, frac.round().long() if rounded else frac.long())


def test_fractional_timesteps_interpolate_log_sigma():
    """Between integer timesteps log(sigma/alpha) is linear in t (k-diffusion's t_to_sigma); integer-valued
    floats are the integer timesteps themselves; sigma_to_t inverts it."""
    path = DiscreteSchedule.from_name("linear", T)
    ls = lambda t: math.log(_nsr(path, t))
    assert path.alpha_sigma(500.0) == path.alpha_sigma(500)
    for t in (0.25, 10.5, 500.3, 998.75):
        lo = math.floor(t)
        w = t - lo
        assert abs(ls(t) - ((1 - w) * ls(lo) + w * ls(lo + 1))) < 1e-12
        a, s = path.alpha_sigma(t)
        assert abs(a * a + s * s - 1) < 1e-15
        assert abs(path.time_at_nsr(s / a) - t) < 1e-9


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_matches_diffusers(name):
    """schedules.rescale_zero_terminal_snr is diffusers' rescale_zero_terminal_snr (Lin et al. 2024,
    Algorithm 1): the same betas from the same float64 input, and DDIMScheduler(rescale_betas_zero_snr=True)'s
    float32 alphas_cumprod, whose last value is 0."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    betas = schedules.get_betas(name, T, 0.00085, 0.012) if name == "scaled_linear" else schedules.get_betas(name, T)
    ours = schedules.rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours, rescale_zero_terminal_snr(betas.clone()), atol=1e-15, rtol=1e-12)
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME.get(name, name),
                        rescale_betas_zero_snr=True, **kw)
    ac = schedules.alphas_cumprod(ours)
    assert ac[-1].item() == 0.0 == ref.alphas_cumprod[-1].item() and ours[-1].item() == 1.0
    torch.testing.assert_close(ac.float(), ref.alphas_cumprod, atol=2e-6, rtol=1e-4)
