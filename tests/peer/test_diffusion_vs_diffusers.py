"""The forward process and the v target against diffusers' DDPMScheduler (add_noise, get_velocity). The
checks that need no diffusers are in tests/test_diffusion.py."""
from __future__ import annotations

import pytest
import torch

from difflo.diffusion import DiscreteSchedule, q_sample, target

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SHAPE = (6, 3, 5, 5)
TS = torch.tensor([0, 1, 17, 500, 998, 999])


def _randn(seed, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_matches_diffusers_add_noise(name):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name])
    path = DiscreteSchedule.from_name(name)
    x0, eps = _randn(0), _randn(1)
    t = torch.randint(0, T, (SHAPE[0],), generator=torch.Generator().manual_seed(2))
    t[0], t[-1] = 0, T - 1
    alpha, sigma = path.alpha_sigma(t)
    x_t = q_sample(x0, eps, alpha, sigma)
    assert x_t.dtype == torch.float32 and x_t.shape == SHAPE
    torch.testing.assert_close(x_t, ref.add_noise(x0, eps, t), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_v_target_matches_diffusers_get_velocity(name):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], prediction_type="v_prediction")
    path = DiscreteSchedule.from_name(name)
    x0, eps = _randn(7), _randn(8)
    alpha, sigma = path.alpha_sigma(TS)
    torch.testing.assert_close(target(x0, eps, alpha, sigma, "v"), ref.get_velocity(x0, eps, TS),
                               atol=2e-6, rtol=1e-5)
