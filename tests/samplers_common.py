"""Helpers shared by tests/test_samplers*.py and tests/peer/test_samplers_vs_diffusers.py (no diffusers here).

Importable as ``samplers_common`` from all: tests/ is on sys.path through tests/conftest.py."""
from __future__ import annotations

import math

import torch

from difflo.diffusion import DiscreteSchedule
from difflo.edm import EDMPath
from difflo.flow import FlowPath
from difflo.noise_paths import OBJECTIVES, samplers_for
from difflo.samplers import SAMPLERS

T = 1000
SHAPE = (2, 3, 4, 4)
NOISE_SEED = 7

_PATHS: dict[str, DiscreteSchedule] = {}


def path_for(name: str) -> DiscreteSchedule:
    """The T-step discrete schedule of that name (built once per session)."""
    if name not in _PATHS:
        _PATHS[name] = DiscreteSchedule.from_name(name, T)
    return _PATHS[name]


def ztsnr_path(name: str) -> DiscreteSchedule:
    """The T-step schedule of that name rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1)."""
    from difflo import schedules
    betas = schedules.rescale_zero_terminal_snr(schedules.get_betas(name, T))
    return DiscreteSchedule(schedules.alphas_cumprod(betas))


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


# --------------------------------------------------------------------------- every registered sampler
SAMPLER_OPTIONS = {
    "ddpm": [{"variance": "fixed_small"}, {"variance": "fixed_large"}],
    "ddim": [{"eta": 0.0}, {"eta": 1.0}],
    "euler": [{}, {"s_churn": 2.0}],          # churn: EDM's Algorithm 2 (gamma = 2/8 per step), stochastic
    "heun": [{}, {"s_churn": 2.0, "s_noise": 1.003}],
}
# Every registered sampler, with each of its option sets, on every objective's path it fits: built from the
# registry (SAMPLERS and the paths' flags), so a new sampler is run by every test over these cases.
SAMPLER_CASES = [(name, opts, objective) for name in sorted(SAMPLERS) for opts in SAMPLER_OPTIONS.get(name, [{}])
                 for objective in OBJECTIVES if name in samplers_for(objective)]


def case_id(name, opts, objective) -> str:
    return f"{name}-{objective}-{'-'.join(f'{k}={v}' for k, v in opts.items())}"


def objective_path(objective: str):
    """The path the common tests run an objective's samplers on."""
    if objective == "edm":
        return EDMPath()                                          # EDM's defaults: sigma from 80 to 0.002, then 0
    return FlowPath() if objective == "flow" else path_for("cosine")   # flow: the straight path, t from 1 to 0


def first_spacing(path) -> str:
    """trailing where the path takes it (diffusion, flow), else its own first grid (EDM's karras)."""
    return "trailing" if "trailing" in path.spacings else path.spacings[0]


# --------------------------------------------------------------------------- exact Gaussian data
# x0 ~ N(mu, diag(s^2)) on D = 16 dims, shaped (N, 1, 4, 4). For this data E[x0 | x_t] is known in closed
# form, so samplers driven by the exact denoiser can be checked against the data's moments.
MU = torch.linspace(-1.0, 1.0, 16).reshape(1, 1, 4, 4)
S = torch.linspace(0.2, 1.5, 16).reshape(1, 1, 4, 4)


class GaussianDenoiser:
    """E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)."""

    def __init__(self, path, mu=MU, s=S):
        self.path, self.mu, self.s2 = path, mu, s**2

    def __call__(self, x, t):
        a, sg = self.path.alpha_sigma(t)
        return self.mu + (a * self.s2 / (a * a * self.s2 + sg * sg)) * (x - a * self.mu)


def exact_chain_moments(path, ts, kind, eta=0.0, variance="fixed_small"):
    """Exact per-dimension mean and variance of the *discretized* chain's output for the Gaussian data,
    written from the papers' formulas (DDIM Eq. 12/16; DDPM posterior, Ho et al. Eq. 7) on moments:
    with x0_hat = k x + (1 - k alpha) mu every step is x_prev = A x + B + c z. ``ts`` is the sampler's
    grid, its clean end included."""
    mu, s2 = MU[0, 0].double(), S[0, 0].double() ** 2
    m, v = torch.zeros_like(mu), torch.ones_like(mu)
    ts = [int(t) for t in ts]
    for t, tp in zip(ts[:-1], ts[1:]):
        ab_t = path.alphas_cumprod[t].item()
        ab_p = path.alphas_cumprod[tp].item() if tp >= 0 else 1.0
        a = math.sqrt(ab_t)
        k = a * s2 / (ab_t * s2 + 1 - ab_t)
        kx, k0 = k, (1 - k * a) * mu            # x0_hat = kx x + k0
        if kind == "ddim":
            c2 = eta**2 * (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
            d = math.sqrt(max(1 - ab_p - c2, 0.0)) / math.sqrt(1 - ab_t)   # coefficient of eps_hat / ...
            A = math.sqrt(ab_p) * kx + d * (1 - a * kx)
            B = math.sqrt(ab_p) * k0 - d * a * k0
        else:
            beta = 1 - ab_t / ab_p
            A = math.sqrt(ab_p) * beta / (1 - ab_t) * kx + math.sqrt(1 - beta) * (1 - ab_p) / (1 - ab_t)
            B = math.sqrt(ab_p) * beta / (1 - ab_t) * k0
            c2 = 0.0 if tp < 0 else ((1 - ab_p) / (1 - ab_t) * beta if variance == "fixed_small" else beta)
        m, v = A * m + B, A * A * v + c2
    return m, v



class UnitNoise:
    """A noise callable for :func:`affine_chain_moments`: its k-th draw is 1 in batch row 2 + k, 0 elsewhere."""

    def __init__(self, rows: int):
        self.rows, self.k = rows, 0

    def __call__(self):
        z = torch.zeros(self.rows, 1, 4, 4, dtype=torch.float64)
        assert self.k + 2 < self.rows, "more noise draws than grid steps"
        z[self.k + 2] = 1.0
        self.k += 1
        return z


def affine_chain_moments(fn, path, ts, mu=MU, s=S, **opts):
    """Exact per-dimension mean and variance of a sampler's output for the Gaussian data, from x_T ~ N(0, I)
    (times the path's ``prior_std``).

    With the exact (affine) denoiser every sampler is, per dimension, affine in its start and its noise draws:
    out = A x_T + b + sum_k c_k z_k. One float64 run over a batch recovers the coefficients (row 0 starts at
    0: b; row 1 at 1: A + b; row 2 + k gets the unit k-th draw: c_k + b), so mean = b and
    variance = A^2 + sum_k c_k^2, the moments of the discretized chain itself, without sampling error."""
    rows = len(ts) + 2                           # at most one draw per step
    x = torch.zeros(rows, 1, 4, 4, dtype=torch.float64)
    x[1] = path.prior_std                        # x_T = prior_std z (EDM: sigma_max z): row 1 is z = 1
    out = fn(GaussianDenoiser(path, mu.double(), s.double()), x, ts, noise=UnitNoise(rows), **opts)
    b, A, c = out[0], out[1] - out[0], out[2:] - out[0]
    return b[0], (A**2 + (c**2).sum(0))[0]
