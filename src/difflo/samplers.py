"""Samplers: plain functions over one denoiser interface (see :mod:`difflo.guidance`).

Every sampler has the signature::

    sample_x(denoiser, x, ts, extra_args=None, callback=None, noise=None, **options) -> x0

* ``x`` (B, C, H, W): the starting point, normally pure noise scaled to the first timestep.
* ``ts``: the time grid, decreasing, **ending at the clean data** (alpha = 1, sigma = 0), e.g.
  ``path.sampling_times(50)`` = ``[999, 979, ..., 19, -1]`` for discrete diffusion or
  ``[1.0, 0.95, ..., 0.05, 0.0]`` for flow matching. A sampler walks ``zip(ts[:-1], ts[1:])``, so
  running part of a trajectory (SDEdit from the middle, RePaint's chunks) is a slice of the grid.
* ``extra_args``: keyword arguments passed to the denoiser on every call (e.g. ``{"y": labels}``).
* ``callback``: called after every step from ``t`` to ``t_prev`` with
  ``{"i", "t", "t_prev", "x", "denoised"}`` (``x`` is the new state at ``t_prev``); editing methods
  (inpainting, SDEdit) plug in there.
* ``noise``: a callable returning a fresh standard-normal tensor shaped like ``x`` (stochastic
  samplers only). :class:`SeededNoise` draws it from one generator per sample, so an image
  depends on its seed only, never on the batch it was drawn in.

Samplers use only ``alpha_t, sigma_t`` of ``denoiser.path`` (x_t = alpha_t x0 + sigma_t eps).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch


class SeededNoise:
    """Standard-normal noise from one ``torch.Generator`` per sample (EDM's per-seed generators):
    the k-th call returns, for sample i, the k-th draw of generator ``seeds[i]``."""

    def __init__(self, seeds, shape: tuple[int, ...], device="cpu"):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), device

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def _eps(x: torch.Tensor, x0: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """eps_hat = (x_t - alpha_t x0_hat) / sigma_t."""
    return (x - alpha * x0) / sigma


def _steps(ts):
    """Triples (i, t, t_prev) over consecutive times of the grid (the last t_prev is its end)."""
    ts = ts.tolist() if isinstance(ts, torch.Tensor) else [t.item() if isinstance(t, torch.Tensor) else t for t in ts]
    return [(i, t, t_prev) for i, (t, t_prev) in enumerate(zip(ts[:-1], ts[1:]))]


def _require_noise(noise, name):
    if noise is None:
        raise ValueError(f"{name} is stochastic: pass noise=SeededNoise(seeds, shape) or another noise callable")
    return noise


# DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Eq. 12 and 16).
def ddim_step(x: torch.Tensor, x0: torch.Tensor, path, t: int, t_prev: int, eta: float = 0.0,
              noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev}:
    x_prev = alpha_prev x0 + sqrt(sigma_prev^2 - c^2) eps + c z, with
    c = eta * sigma_prev * sqrt(1 - (alpha_t sigma_prev / (alpha_prev sigma_t))^2)
    (the DDPM posterior standard deviation times eta; eta = 1 is DDPM, eta = 0 deterministic)."""
    a_t, s_t = path.alpha_sigma(t)
    a_p, s_p = path.alpha_sigma(t_prev)
    eps = _eps(x, x0, a_t, s_t)
    c = eta * s_p * max(0.0, 1.0 - (a_t * s_p / (a_p * s_t)) ** 2) ** 0.5
    x_prev = a_p * x0 + max(s_p**2 - c**2, 0.0) ** 0.5 * eps
    if c > 0:
        x_prev = x_prev + c * _require_noise(noise, "DDIM with eta > 0")()
    return x_prev


@torch.no_grad()
def sample_ddim(denoiser, x, ts, extra_args=None, callback=None, noise=None, eta: float = 0.0):
    """DDIM sampling over the given timesteps (eta = 0: the probability-flow ODE's DDIM solver)."""
    step = lambda x, x0, t, t_prev: ddim_step(x, x0, denoiser.path, t, t_prev, eta, noise)
    return _one_eval_per_step(denoiser, x, ts, step, extra_args, callback)


def _one_eval_per_step(denoiser, x, ts, step, extra_args, callback):
    """The loop of every first-order sampler: denoise at t, then x <- step(x, x0_hat, t, t_prev)."""
    extra_args = extra_args or {}
    for i, t, t_prev in _steps(ts):
        x0 = denoiser(x, t, **extra_args)
        x = step(x, x0, t, t_prev)
        if callback is not None:
            callback({"i": i, "t": t, "t_prev": t_prev, "x": x, "denoised": x0})
    return x


# DDPM ancestral sampling (Ho et al. 2020, Algorithm 2, with Eq. 6-7 for the posterior).
def ddpm_step(x: torch.Tensor, x0: torch.Tensor, path, t: int, t_prev: int, variance: str = "fixed_small",
              noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """One ancestral step x_t -> x_{t_prev} from q(x_prev | x_t, x0_hat):
    mean = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(1 - beta_t) (1 - abar_prev) / (1 - abar_t) x_t,
    with beta_t = 1 - abar_t / abar_prev (strided steps, as in diffusers), and variance
    ``fixed_small`` = beta_tilde = (1 - abar_prev) / (1 - abar_t) beta_t or ``fixed_large`` = beta_t.
    No noise is added on the last step (to the clean data). DDPM assumes a variance-preserving
    path (alpha^2 + sigma^2 = 1)."""
    a_t, s_t = path.alpha_sigma(t)
    a_p, s_p = path.alpha_sigma(t_prev)
    ab_t, ab_p = a_t**2, a_p**2
    beta = 1.0 - ab_t / ab_p
    mean = (a_p * beta / s_t**2) * x0 + ((1.0 - beta) ** 0.5 * s_p**2 / s_t**2) * x
    if s_p == 0.0:
        return mean
    if variance == "fixed_small":
        var = max(s_p**2 / s_t**2 * beta, 1e-20)
    elif variance == "fixed_large":
        var = beta
    else:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose fixed_small or fixed_large")
    return mean + var**0.5 * _require_noise(noise, "DDPM")()


@torch.no_grad()
def sample_ddpm(denoiser, x, ts, extra_args=None, callback=None, noise=None, variance: str = "fixed_small"):
    """DDPM ancestral sampling; with all T timesteps this is Ho et al.'s Algorithm 2."""
    step = lambda x, x0, t, t_prev: ddpm_step(x, x0, denoiser.path, t, t_prev, variance, noise)
    return _one_eval_per_step(denoiser, x, ts, step, extra_args, callback)


# Euler and Heun ODE solvers in the path's own time (for flow matching: the straight path, where
# dx/dt = u = d alpha/dt x0 + d sigma/dt eps). Heun: Karras et al. 2022, "Elucidating the Design
# Space of Diffusion-Based Generative Models", Algorithm 1, in time t instead of sigma.
def _velocity(x: torch.Tensor, x0: torch.Tensor, path, t) -> torch.Tensor:
    """dx/dt at (x, t) implied by the denoised x0: alpha'(t) x0 + sigma'(t) eps_hat."""
    if not path.continuous:
        raise ValueError("euler/heun integrate a continuous-time path (objective: flow); "
                         "use ddim or ddpm for discrete diffusion")
    a, s = path.alpha_sigma(t)
    da, ds = path.d_alpha_sigma(t)
    return da * x0 + ds * _eps(x, x0, a, s)


@torch.no_grad()
def sample_euler(denoiser, x, ts, extra_args=None, callback=None, noise=None):
    """Euler's method for dx/dt = u(x, t) from t = ts[0] down to the clean end: x += (t_prev - t) u."""
    step = lambda x, x0, t, t_prev: x + (t_prev - t) * _velocity(x, x0, denoiser.path, t)
    return _one_eval_per_step(denoiser, x, ts, step, extra_args, callback)


@torch.no_grad()
def sample_heun(denoiser, x, ts, extra_args=None, callback=None, noise=None):
    """Heun's 2nd-order method: an Euler predictor, then the average of the slopes at both ends.
    The last step (to the clean data, where eps_hat is undefined) is an Euler step, as in EDM:
    2n - 1 network evaluations for n steps."""
    extra_args = extra_args or {}
    path = denoiser.path
    for i, t, t_prev in _steps(ts):
        x0 = denoiser(x, t, **extra_args)
        d = _velocity(x, x0, path, t)
        x_next = x + (t_prev - t) * d                                   # Euler predictor
        if path.alpha_sigma(t_prev)[1] > 0:                             # apply 2nd order correction
            d_next = _velocity(x_next, denoiser(x_next, t_prev, **extra_args), path, t_prev)
            x_next = x + (t_prev - t) * 0.5 * (d + d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "t": t, "t_prev": t_prev, "x": x, "denoised": x0})
    return x


def _log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), with its limits -inf (pure noise, alpha = 0) and +inf (clean, sigma = 0)."""
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


# DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
# Probabilistic Models", Algorithm 2: multistep, second order, data prediction, in lambda = log(alpha/sigma)).
def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor | None, path, t, t_prev,
                  t_last=None) -> torch.Tensor:
    """One step x_t -> x_{t_prev} with h = lambda_{t_prev} - lambda_t:
    x_prev = (sigma_prev / sigma_t) x - alpha_prev (e^{-h} - 1) D, where D = x0 (first order, the DDIM
    step: the first step, and the last step to sigma = 0) or, given the previous step's x0 estimate
    x0_prev at time t_last, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = (lambda_t - lambda_last) / h."""
    a_t, s_t = path.alpha_sigma(t)
    a_p, s_p = path.alpha_sigma(t_prev)
    lam_t, lam_p = _log_snr(a_t, s_t), _log_snr(a_p, s_p)
    h = lam_p - lam_t
    d = x0
    if x0_prev is not None and s_p > 0:                 # second order (never on the step to clean data)
        lam_last = _log_snr(*path.alpha_sigma(t_last))
        half_inv_r = 0.5 * h / (lam_t - lam_last)       # 1 / (2r); 0 when t_last is pure noise
        d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
    # -(e^{-h} - 1) = -expm1(-h); at sigma_prev = 0 (h = inf) the step returns alpha_prev * D.
    return (s_p / s_t) * x - (a_p * math.expm1(-h)) * d


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, ts, extra_args=None, callback=None, noise=None):
    """DPM-Solver++(2M): one network evaluation per step; the first step is first order (no history
    yet) and so is the last one, to the clean data (sigma = 0, where the second-order term diverges):
    it returns the last x0 estimate, as diffusers' DPMSolverMultistepScheduler does with its default
    final_sigmas_type="zero". Deterministic: ``noise`` is unused."""
    extra_args = extra_args or {}
    path = denoiser.path
    x0_prev, t_last = None, None
    for i, t, t_prev in _steps(ts):
        x0 = denoiser(x, t, **extra_args)
        x = dpmpp_2m_step(x, x0, x0_prev, path, t, t_prev, t_last)
        x0_prev, t_last = x0, t
        if callback is not None:
            callback({"i": i, "t": t, "t_prev": t_prev, "x": x, "denoised": x0})
    return x


@dataclass(frozen=True)
class Sampler:
    """A registry entry: the sampling function, what it needs of the path, and its cost.

    ``needs`` names boolean attributes of the path (``variance_preserving``: DDPM's posterior assumes
    alpha^2 + sigma^2 = 1; ``continuous``: Euler/Heun need d alpha/dt, d sigma/dt); ``evals(n)`` is
    the number of network evaluations (NFE) for a grid of n steps."""
    fn: Callable
    needs: tuple[str, ...] = ()
    evals_per_step: int = 1
    skips_last_correction: bool = False      # Heun: the step to the clean end is an Euler step

    def __call__(self, denoiser, x, ts, **kwargs):
        return self.fn(denoiser, x, ts, **kwargs)

    def fits(self, path) -> bool:
        return all(getattr(path, need, False) for need in self.needs)

    def evals(self, n_steps: int) -> int:
        return n_steps * self.evals_per_step - (1 if self.skips_last_correction else 0)

    @property
    def options(self) -> tuple[str, ...]:
        """Its own keyword options (e.g. ``eta`` for DDIM, ``variance`` for DDPM)."""
        common = {"denoiser", "x", "ts", "extra_args", "callback", "noise"}
        return tuple(p for p in inspect.signature(self.fn).parameters if p not in common)


# Adding a sampler: write ``sample_x`` above, then add one line here.
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(sample_ddpm, needs=("variance_preserving",)),
    "ddim": Sampler(sample_ddim),
    "euler": Sampler(sample_euler, needs=("continuous",)),
    "heun": Sampler(sample_heun, needs=("continuous",), evals_per_step=2, skips_last_correction=True),
    "dpmpp": Sampler(sample_dpmpp_2m),
}


def fitting(path) -> tuple[str, ...]:
    """The names of the samplers that fit a path, in registry order."""
    return tuple(name for name, s in SAMPLERS.items() if s.fits(path))
