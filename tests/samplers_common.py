"""Helpers shared by tests/test_samplers.py and tests/peer/test_samplers_vs_diffusers.py (no diffusers here).

Importable as ``samplers_common`` from both: tests/ is on sys.path through tests/conftest.py."""
from __future__ import annotations

import math

import torch

from difflo.diffusion import DiscreteSchedule

T = 1000
SHAPE = (2, 3, 4, 4)
NOISE_SEED = 7

_PATHS: dict[str, DiscreteSchedule] = {}


def path_for(name: str) -> DiscreteSchedule:
    """The T-step discrete schedule of that name (built once per session)."""
    if name not in _PATHS:
        _PATHS[name] = DiscreteSchedule.from_name(name, T)
    return _PATHS[name]


def step_inputs(i: int, dtype):
    """A state x and a network output, both SHAPE, seeded by i."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE, generator=g, dtype=dtype)


def noise_fn(dtype):
    """A noise callable whose first draw equals torch.randn(SHAPE) of a generator seeded NOISE_SEED."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    return lambda: torch.randn(SHAPE, generator=g, dtype=dtype)


def ddim_closed_form(x, x0, path, t, t_prev):
    """DDIM, eta = 0 (Song et al. 2021, Eq. 12): sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps_hat."""
    ab_t = path.alphas_cumprod[t].item()
    ab_p = path.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    return math.sqrt(ab_p) * x0 + math.sqrt(1 - ab_p) * eps
