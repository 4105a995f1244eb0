"""Noise schedules and timestep spacings against diffusers' DDPMScheduler / DDIMScheduler. The checks
that need no diffusers are in tests/test_schedules.py."""
from __future__ import annotations

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


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
def test_timesteps_match_diffusers_for_every_n(spacing):
    """Every n in 1..T, .5 rounding ties included (e.g. trailing n=48, linspace n=27); for trailing, the
    62 values of n where diffusers appends a -1 are compared on diffusers' first n entries."""
    for n in range(1, T + 1):
        ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert torch.equal(schedules.timesteps(T, n, spacing), ref.timesteps[:n]), (spacing, n)
