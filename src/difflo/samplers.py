"""Samplers: plain functions over one denoiser interface (see :mod:`difflo.guidance`).

Every sampler has the signature::

    sample_x(denoiser, x, ts, extra_args=None, callback=None, noise=None, **options) -> x0

* ``x`` (B, C, H, W): the starting point, normally pure noise scaled to the first timestep.
* ``ts``: the time grid, decreasing, **ending at the clean data** (alpha = 1, sigma = 0), e.g.
  ``path.sampling_times(50)`` = ``[999, 979, ..., 19, -1]`` for discrete diffusion or
  ``[1.0, 0.95, ..., 0.05, 0.0]`` for flow matching. A sampler walks ``zip(ts[:-1], ts[1:])``, so
  running part of a trajectory (SDEdit from the middle, RePaint's chunks) is a slice of the grid.
  Discrete times may be fractional (the ``karras``/``exponential`` noise-level grids); samplers never
  index by time, they only ask the path for ``alpha_sigma(t)``. A :class:`TimeGrid` (diffusers' DDIM step
  rule, ``sample.step_rule: stride``) also says where each step lands when that is not the next listed
  time; samplers see it only through ``_steps``.
* ``extra_args``: keyword arguments passed to the denoiser on every call (e.g. ``{"y": labels}``).
* ``callback``: called after every step from ``t`` to ``t_prev`` with
  ``{"i", "t", "t_prev", "x", "denoised"}`` (``x`` is the new state at ``t_prev``); editing methods
  (inpainting, SDEdit) plug in there.
* ``noise``: a callable returning a fresh standard-normal tensor shaped like ``x`` (stochastic
  samplers only). :class:`SeededNoise` draws it from one generator per sample, so an image
  depends on its seed only, never on the batch it was drawn in.

Samplers use only ``alpha_t, sigma_t`` of ``denoiser.path`` (x_t = alpha_t x0 + sigma_t eps).

Options: what a sampler reads beyond that (``eta``, ``variance``, the churn ``s_*``) is its keyword
parameters, listed by its registry entry (``Sampler.options``) and nowhere else; every front end refuses
an option the user set that the chosen sampler does not read with :func:`check_options`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import DiffloError


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


class TimeGrid(list):
    """A time grid whose steps land elsewhere than on the next listed time. As a list it is the times the
    network is evaluated at, then the grid's end, like any grid; ``lands[i]`` is where the step from
    ``self[i]`` goes (``self[i + 1]`` in a plain list), and the state there is then read as at ``self[i + 1]``.
    diffusers' DDIMScheduler steps from t to t - T // n and then evaluates the network at its next listed
    timestep: ``DiscreteSchedule.sampling_times(n, spacing, step_rule="stride")`` builds such a grid.
    A slice ``ts[i:j + 1]`` (part of a trajectory) keeps the landings of its steps i .. j - 1."""

    def __init__(self, times, lands):
        super().__init__(times)
        self.lands = list(lands)
        if len(self.lands) != max(len(self) - 1, 0):
            raise ValueError(f"a grid of {len(self)} times has {max(len(self) - 1, 0)} steps, got {len(self.lands)} "
                             f"landings")

    def __getitem__(self, k):
        if not isinstance(k, slice):
            return super().__getitem__(k)
        start, stop, step = k.indices(len(self))
        times = super().__getitem__(k)
        if step != 1:
            raise ValueError("a TimeGrid is sliced with step 1 (its steps land between consecutive times)")
        return TimeGrid(times, self.lands[start:start + max(len(times) - 1, 0)])


def _steps(ts):
    """Triples (i, t, t_prev) over the steps of the grid: consecutive times (the last t_prev is its end),
    or a :class:`TimeGrid`'s own landings."""
    lands = getattr(ts, "lands", None)
    ts = ts.tolist() if isinstance(ts, torch.Tensor) else [t.item() if isinstance(t, torch.Tensor) else t for t in ts]
    return [(i, t, t_prev) for i, (t, t_prev) in enumerate(zip(ts[:-1], ts[1:] if lands is None else lands))]


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


# Euler ancestral (k-diffusion's ``sample_euler_ancestral``; diffusers' EulerAncestralDiscreteScheduler).
def ancestral_levels(nsr: float, nsr_next: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's ``get_ancestral_step`` in noise-to-signal ratios r = sigma/alpha (its sigmas): the
    level r_down that a deterministic step goes to and the noise r_up added there, with
    r_down^2 + r_up^2 = r_next^2 and r_up = min(r_next, eta r_next sqrt(1 - r_next^2 / r^2))."""
    ratio = nsr_next / nsr if nsr_next > 0 else 0.0            # 0 also when nsr = inf (pure noise)
    up = min(nsr_next, eta * nsr_next * max(1.0 - ratio * ratio, 0.0) ** 0.5)
    return max(nsr_next**2 - up**2, 0.0) ** 0.5, up


def euler_ancestral_step(x: torch.Tensor, x0: torch.Tensor, path, t, t_prev, eta: float = 1.0,
                         noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """One Euler ancestral step: in k-diffusion's scaled variable x / alpha, an Euler step of the
    probability-flow ODE from r = sigma_t/alpha_t down to r_down, then fresh noise of std r_up
    (:func:`ancestral_levels`); in x itself, x_prev = alpha_prev (x0 + r_down eps_hat + r_up z), which
    never divides by alpha_t (pure noise, alpha = 0, is fine). For eta <= 1 this is DDIM's step with the
    same eta (r_up alpha_prev is DDIM's c), so Euler ancestral (eta = 1) is DDIM with eta = 1 (tested)."""
    a_t, s_t = path.alpha_sigma(t)
    a_p, s_p = path.alpha_sigma(t_prev)
    nsr = s_t / a_t if a_t > 0 else math.inf
    down, up = ancestral_levels(nsr, s_p / a_p, eta)
    x_prev = a_p * x0 + (a_p * down) * _eps(x, x0, a_t, s_t)
    if up > 0:
        x_prev = x_prev + (a_p * up) * _require_noise(noise, "Euler ancestral")()
    return x_prev


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, ts, extra_args=None, callback=None, noise=None):
    """Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral`` with eta = 1, Karras et al.
    2022's Euler step in sigma plus ancestral noise): one evaluation per step, stochastic; equal to
    diffusers' EulerAncestralDiscreteScheduler on the same grid (tested step by step)."""
    step = lambda x, x0, t, t_prev: euler_ancestral_step(x, x0, denoiser.path, t, t_prev, 1.0, noise)
    return _one_eval_per_step(denoiser, x, ts, step, extra_args, callback)


# DDPM ancestral sampling (Ho et al. 2020, Algorithm 2, with Eq. 6-7 for the posterior).
VARIANCES = ("fixed_small", "fixed_large")      # the reverse variance: beta_tilde (posterior) or beta


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
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    return mean + var**0.5 * _require_noise(noise, "DDPM")()


@torch.no_grad()
def sample_ddpm(denoiser, x, ts, extra_args=None, callback=None, noise=None, variance: str = "fixed_small"):
    """DDPM ancestral sampling; with all T timesteps this is Ho et al.'s Algorithm 2."""
    step = lambda x, x0, t, t_prev: ddpm_step(x, x0, denoiser.path, t, t_prev, variance, noise)
    return _one_eval_per_step(denoiser, x, ts, step, extra_args, callback)


# Euler and Heun in the path's own time (for flow matching: the straight path, where
# dx/dt = u = d alpha/dt x0 + d sigma/dt eps). Heun: Karras et al. 2022, "Elucidating the Design
# Space of Diffusion-Based Generative Models", Algorithm 1, in time t instead of sigma; with churn
# (s_churn > 0) their stochastic sampler, Algorithm 2.
def _velocity(x: torch.Tensor, x0: torch.Tensor, path, t) -> torch.Tensor:
    """dx/dt at (x, t) implied by the denoised x0: alpha'(t) x0 + sigma'(t) eps_hat."""
    if not path.continuous:
        raise ValueError("euler/heun integrate a continuous-time path (objective: flow); "
                         "use ddim or ddpm for discrete diffusion")
    a, s = path.alpha_sigma(t)
    da, ds = path.d_alpha_sigma(t)
    return da * x0 + ds * _eps(x, x0, a, s)


def churn(x: torch.Tensor, path, t, gamma: float, noise: Callable[[], torch.Tensor], s_noise: float = 1.0):
    """Karras et al. 2022, Algorithm 2, lines 5-6 ("increase noise temporarily"): move x from t to the
    noisier t_hat whose noise-to-signal ratio sigma/alpha (EDM's sigma) is (1 + gamma) times t's, by the
    path's forward process q(x_hat | x_t): x_hat = (alpha_hat / alpha_t) x + sqrt(sigma_hat^2 -
    (alpha_hat sigma_t / alpha_t)^2) S_noise z (EDM's x + sqrt(t_hat^2 - t^2) S_noise eps, scaled by
    alpha). Returns (x_hat, t_hat)."""
    a, s = path.alpha_sigma(t)
    t_hat = path.time_at_nsr((1.0 + gamma) * s / a)
    a_h, s_h = path.alpha_sigma(t_hat)
    std = max(s_h**2 - (a_h * s / a) ** 2, 0.0) ** 0.5
    return (a_h / a) * x + (std * s_noise) * noise(), t_hat


def _edm_loop(denoiser, x, ts, extra_args, callback, noise, second_order: bool, s_churn: float, s_tmin: float,
              s_tmax: float, s_noise: float):
    """Karras et al. 2022, Algorithm 2 in the path's time (Algorithm 1 when s_churn = 0): per step, churn
    with gamma = min(s_churn / N, sqrt(2) - 1) where s_tmin <= t <= s_tmax (N = the grid's steps; none at
    pure noise, alpha = 0), an Euler step from t_hat to t_prev, and (second_order) Heun's correction
    unless t_prev is the clean end."""
    extra_args = extra_args or {}
    path = denoiser.path
    steps = _steps(ts)
    for i, t, t_prev in steps:
        t_hat = t
        gamma = min(s_churn / len(steps), 2**0.5 - 1) if s_churn > 0 and s_tmin <= t <= s_tmax else 0.0
        if gamma > 0 and path.alpha_sigma(t)[0] > 0:
            x, t_hat = churn(x, path, t, gamma, _require_noise(noise, "churn (s_churn > 0)"), s_noise)
        x0 = denoiser(x, t_hat, **extra_args)
        d = _velocity(x, x0, path, t_hat)
        x_next = x + (t_prev - t_hat) * d                               # Euler step
        if second_order and path.alpha_sigma(t_prev)[1] > 0:           # apply 2nd order correction
            d_next = _velocity(x_next, denoiser(x_next, t_prev, **extra_args), path, t_prev)
            x_next = x + (t_prev - t_hat) * 0.5 * (d + d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "t": t, "t_prev": t_prev, "x": x, "denoised": x0})
    return x


@torch.no_grad()
def sample_euler(denoiser, x, ts, extra_args=None, callback=None, noise=None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
    """Euler's method for dx/dt = u(x, t) from t = ts[0] down to the clean end: x += (t_prev - t) u;
    with s_churn > 0 EDM's churn before each step (Karras et al. 2022, Algorithm 2 without its
    correction): stochastic."""
    return _edm_loop(denoiser, x, ts, extra_args, callback, noise, False, s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_heun(denoiser, x, ts, extra_args=None, callback=None, noise=None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): an Euler predictor, then the average
    of the slopes at both ends. The last step (to the clean data, where eps_hat is undefined) is an
    Euler step, as in EDM: 2n - 1 network evaluations for n steps. s_churn > 0: Algorithm 2 (stochastic)."""
    return _edm_loop(denoiser, x, ts, extra_args, callback, noise, True, s_churn, s_tmin, s_tmax, s_noise)


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
                  t_last=None, eta: float = 0.0, noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """One step x_t -> x_{t_prev} with h = lambda_{t_prev} - lambda_t:
    x_prev = (sigma_prev / sigma_t) e^{-eta h} x - alpha_prev (e^{-(1 + eta) h} - 1) D
             + sigma_prev sqrt(1 - e^{-2 eta h}) z,
    where D = x0 (first order, the DDIM step for eta = 0: the first step, and the last step to sigma = 0)
    or, given the previous step's x0 estimate x0_prev at time t_last, the midpoint
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = (lambda_t - lambda_last) / h. eta = 0 is the ODE solver
    (Algorithm 2); eta = 1 is DPM-Solver++(2M) SDE, the same exponential integrator for the reverse diffusion
    SDE (by Lu for diffusers' ``algorithm_type="sde-dpmsolver++"``, 2023; k-diffusion's ``sample_dpmpp_2m_sde``,
    whose eta form this is)."""
    a_t, s_t = path.alpha_sigma(t)
    a_p, s_p = path.alpha_sigma(t_prev)
    lam_t, lam_p = _log_snr(a_t, s_t), _log_snr(a_p, s_p)
    h = lam_p - lam_t
    eh = eta * h if eta else 0.0                        # (eta = 0 at h = inf: no 0 * inf)
    d = x0
    if x0_prev is not None and s_p > 0:                 # second order (never on the step to clean data)
        lam_last = _log_snr(*path.alpha_sigma(t_last))
        half_inv_r = 0.5 * h / (lam_t - lam_last)       # 1 / (2r); 0 when t_last is pure noise
        d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
    # -(e^{-h'} - 1) = -expm1(-h'); at sigma_prev = 0 (h = inf) the step returns alpha_prev * D.
    x_prev = (s_p / s_t * math.exp(-eh)) * x - (a_p * math.expm1(-h - eh)) * d
    if eh > 0 and s_p > 0:
        x_prev = x_prev + (s_p * (-math.expm1(-2.0 * eh)) ** 0.5) * _require_noise(noise, "DPM-Solver++ SDE")()
    return x_prev


# DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++": the multistep data-prediction solver at third order, as
# the DPM-Solver code, k-diffusion and diffusers' DPMSolverMultistepScheduler(solver_order=3) write it).
def dpmpp_3m_step(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor, x0_prev2: torch.Tensor, path, t,
                  t_prev, t_last, t_last2) -> torch.Tensor:
    """One third-order step from the x0 estimates m0, m1, m2 at t, t_last, t_last2 (newest first), with
    h = lambda_prev - lambda_t, r0 = (lambda_t - lambda_last) / h, r1 = (lambda_last - lambda_last2) / h:
    D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
    D2 = (D1_0 - D1_1) / (r0 + r1), and
    x_prev = (sigma_prev / sigma_t) x - alpha_prev (e^{-h} - 1) m0 + alpha_prev ((e^{-h} - 1) / h + 1) D1
             - alpha_prev ((e^{-h} - 1 + h) / h^2 - 1/2) D2.
    The step to the clean data (sigma = 0) is first order, as in :func:`dpmpp_2m_step`; where an older point
    is pure noise (lambda = -inf) its terms vanish (1 / r1 = 0), the formula's limit. D2 estimates h^2 x0''/2
    while its coefficient alpha h phi_3(h) belongs to h^2 x0'': the step's local error is O(h^3), as 2M's but
    smaller (tests/unit/test_samplers.py pins it); kept so that the chain equals diffusers'."""
    a_p, s_p = path.alpha_sigma(t_prev)
    if s_p == 0.0:
        return dpmpp_2m_step(x, x0, None, path, t, t_prev)
    a_t, s_t = path.alpha_sigma(t)
    lam_t, lam_p = _log_snr(a_t, s_t), _log_snr(a_p, s_p)
    lam_1, lam_2 = _log_snr(*path.alpha_sigma(t_last)), _log_snr(*path.alpha_sigma(t_last2))
    h = lam_p - lam_t
    r0, r1 = (lam_t - lam_1) / h, (lam_1 - lam_2) / h
    d1_0, d1_1 = (1.0 / r0) * (x0 - x0_prev), (1.0 / r1) * (x0_prev - x0_prev2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    em1 = math.expm1(-h)                                # e^{-h} - 1
    return ((s_p / s_t) * x - (a_p * em1) * x0 + (a_p * (em1 / h + 1.0)) * d1
            - (a_p * ((em1 + h) / h**2 - 0.5)) * d2)


LOWER_ORDER_FINAL_BELOW = 15    # diffusers' lower_order_final: grids of fewer steps end with lower orders


def _multistep(denoiser, x, ts, order: int, step, extra_args, callback):
    """The loop of the multistep solvers: denoise at t, then x <- step(x, history, t_prev, k), history being
    the (t, x0_hat) pairs of this step and up to order - 1 earlier ones (newest last) and k the order to use:
    at most the number of estimates so far and, on grids of fewer than LOWER_ORDER_FINAL_BELOW steps, at
    most the number of steps left (diffusers' lower_order_final: 2nd order on the last but one step, 1st
    on the last)."""
    extra_args = extra_args or {}
    steps = _steps(ts)
    history = []
    for i, t, t_prev in steps:
        x0 = denoiser(x, t, **extra_args)
        history = (history + [(t, x0)])[-order:]
        left = len(steps) - i
        k = min(len(history), left if len(steps) < LOWER_ORDER_FINAL_BELOW else order)
        x = step(x, history, t_prev, k)
        if callback is not None:
            callback({"i": i, "t": t, "t_prev": t_prev, "x": x, "denoised": x0})
    return x


def _dpmpp_2m_update(path, eta: float = 0.0, noise=None):
    """The :func:`_multistep` step of DPM-Solver++(2M) (eta = 0) and its SDE variant (eta = 1)."""
    def step(x, history, t_prev, k):
        (t, x0), last = history[-1], history[-2] if k >= 2 else (None, None)
        return dpmpp_2m_step(x, x0, last[1], path, t, t_prev, last[0], eta, noise)
    return step


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, ts, extra_args=None, callback=None, noise=None):
    """DPM-Solver++(2M): one network evaluation per step; the first step is first order (no history
    yet) and so is the last one, to the clean data (sigma = 0, where the second-order term diverges):
    it returns the last x0 estimate, as diffusers' DPMSolverMultistepScheduler does with its default
    final_sigmas_type="zero". Deterministic: ``noise`` is unused."""
    return _multistep(denoiser, x, ts, 2, _dpmpp_2m_update(denoiser.path), extra_args, callback)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, ts, extra_args=None, callback=None, noise=None):
    """DPM-Solver++(2M) SDE (:func:`dpmpp_2m_step` with eta = 1, after Lu et al. 2022): the same multistep
    scheme with fresh noise at every step but the last; equal to diffusers'
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="midpoint"). Stochastic."""
    return _multistep(denoiser, x, ts, 2, _dpmpp_2m_update(denoiser.path, 1.0, noise), extra_args, callback)


@torch.no_grad()
def sample_dpmpp_3m(denoiser, x, ts, extra_args=None, callback=None, noise=None):
    """DPM-Solver++(3M): :func:`dpmpp_3m_step` once two earlier x0 estimates exist, 2M before (the 2nd
    step), first order on the first and on the step to the clean data, and on grids of fewer than 15 steps
    2nd order on the last but one (diffusers' DPMSolverMultistepScheduler(solver_order=3) defaults; tested
    equal). Deterministic: ``noise`` is unused."""
    path = denoiser.path

    def step(x, history, t_prev, k):
        if k < 3:
            return _dpmpp_2m_update(path)(x, history, t_prev, k)
        (t2, m2), (t1, m1), (t, m0) = history
        return dpmpp_3m_step(x, m0, m1, m2, path, t, t_prev, t1, t2)
    return _multistep(denoiser, x, ts, 3, step, extra_args, callback)


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
    "euler_ancestral": Sampler(sample_euler_ancestral),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde),
    "dpmpp_3m": Sampler(sample_dpmpp_3m),
}

# Every sampler option (a keyword some registered sampler reads, from the entries' ``options``), in registry order.
OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(o for s in SAMPLERS.values() for o in s.options))


# Options that act only while another is on: EDM's churn window and noise scale need s_churn > 0.
NEEDS_ON = {"s_tmin": "s_churn", "s_tmax": "s_churn", "s_noise": "s_churn"}


def fitting(path) -> tuple[str, ...]:
    """The names of the samplers that fit a path, in registry order."""
    return tuple(name for name, s in SAMPLERS.items() if s.fits(path))


def users(option: str) -> tuple[str, ...]:
    """The samplers that read ``option``, in registry order."""
    return tuple(name for name, s in SAMPLERS.items() if option in s.options)


def as_flag(option: str) -> str:
    """An option as its command-line flag: ``s_churn`` -> ``--s-churn``."""
    return "--" + option.replace("_", "-")


def unused_option(sampler: str, option: str, spell: Callable[[str], str] = as_flag, fits=None,
                  which: str = "") -> str | None:
    """None if ``sampler`` reads ``option``; else the one line that says so: ``--eta has no effect with sampler
    dpmpp; it is used by ddim``. ``fits``: the samplers of the model at hand (users that fit none of them are
    named as such); ``which``: how the sampler was chosen, said after its name (e.g. "the run's sample.sampler").
    The one check of every front end (through :func:`difflo.generate.settings_for`: ``difflo sample``, ``eval``,
    the experiments, the web page; and the run's config values in :func:`difflo.generate.check_settings`): what a
    sampler reads is its entry's ``options`` (its function's keywords), nowhere else."""
    if option in SAMPLERS[sampler].options:
        return None
    takers = users(option)
    fit = [n for n in takers if fits is None or n in fits]
    named = ", ".join(fit) if fit else f"{', '.join(takers)}, none of which fits this model"
    return (f"{spell(option)} has no effect with sampler {sampler}{f' ({which})' if which else ''}; "
            f"it is used by {named}")


def check_options(sampler: str, given, spell: Callable[[str], str] = as_flag, fits=None, which: str = "") -> None:
    """Raise a one-line DiffloError for the first of ``given`` (sampler option names a user set) that
    ``sampler`` does not read (:func:`unused_option`)."""
    for option in given:
        if option not in OPTIONS:
            raise ValueError(f"{option!r} is not a sampler option ({', '.join(OPTIONS)})")
        message = unused_option(sampler, option, spell, fits, which)
        if message:
            raise DiffloError(message)
