"""Discrete noise schedules for DDPM-style diffusion, computed in float64.

Conventions (used everywhere in difflo):

* ``T`` training timesteps, indexed ``t = 0 .. T-1``. **t = 0 is (almost) clean data, t = T-1 is
  (almost) pure noise.** ``t = -1`` stands for the clean data itself (``alpha_bar = 1``).
* ``alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`` ("alpha bar"), so
  ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
* ``snr(t) = alpha_bar_t / (1 - alpha_bar_t)``.

Every function is a pure function of its arguments and returns float64 values (tensors for the
schedules, numpy arrays or lists for the noise-level grids at the end).
"""
from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULES = ("linear", "cosine", "sigmoid")                 # named schedules (difflo's training choices)
BETA_SCHEDULES = SCHEDULES + ("scaled_linear", "explicit")  # every diffusion.schedule a config may name


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Sec. 4: beta_t linear in t,
    from 1e-4 to 0.02 over T = 1000 steps. ``beta_start``/``beta_end`` are given for T = 1000 and
    used as they are (as diffusers' ``beta_schedule="linear"`` does)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """sqrt(beta_t) linear in t (Rombach et al. 2022, Latent Diffusion; diffusers' ``"scaled_linear"``):
    beta_t = (sqrt(beta_start) + t/(T-1) (sqrt(beta_end) - sqrt(beta_start)))^2."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def logistic_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """diffusers' ``beta_schedule="sigmoid"`` (GeoDiff, Xu et al. 2022): beta_t = beta_start +
    (beta_end - beta_start) sigmoid(linspace(-6, 6, T)). Not difflo's ``sigmoid`` schedule (RIN's
    alpha_bar, :func:`sigmoid_betas`); difflo reads it as explicit betas."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


def betas_from_alpha_bar(alpha_bar, T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Turn a continuous alpha_bar(tau), tau in [0, 1], into T betas:
    beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta)  (Nichol & Dhariwal 2021, Eq. 17)."""
    tau = torch.arange(T + 1, dtype=torch.float64) / T
    ab = alpha_bar(tau)
    return torch.clamp(1.0 - ab[1:] / ab[:-1], max=max_beta)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, "Improved DDPM", Eq. 17:
    alpha_bar(tau) = f(tau)/f(0), f(tau) = cos(((tau + s)/(1 + s)) * pi/2)^2, betas capped at 0.999."""
    return betas_from_alpha_bar(lambda tau: torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2, T, max_beta)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> torch.Tensor:
    """Jabri, Fleet & Chen 2022, "Scalable Adaptive Computation for Iterative Generation" (RIN),
    Alg. 1: alpha_bar(t) = (sigmoid(end/tau) - sigmoid((t (end - start) + start)/tau))
    / (sigmoid(end/tau) - sigmoid(start/tau)), then betas as for the cosine schedule."""
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))

    def alpha_bar(t: torch.Tensor) -> torch.Tensor:
        return (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar(lambda t: alpha_bar(t).to(torch.float64).clamp(min=1e-12), T, max_beta)


def get_betas(name: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02,
              betas=None) -> torch.Tensor:
    """The betas of a schedule: a named one ("linear", "cosine" or "sigmoid"), "scaled_linear"
    (``linear`` and ``scaled_linear`` run from ``beta_start`` to ``beta_end``), or "explicit": the T
    values of ``betas`` themselves (e.g. a diffusers scheduler's ``trained_betas``)."""
    if name == "linear":
        return linear_betas(T, beta_start, beta_end)
    if name == "scaled_linear":
        return scaled_linear_betas(T, beta_start, beta_end)
    if name == "cosine":
        return cosine_betas(T)
    if name == "sigmoid":
        return sigmoid_betas(T)
    if name == "explicit":
        values = torch.as_tensor(list(betas or ()), dtype=torch.float64)
        if values.shape != (T,):
            raise ValueError(f"an explicit schedule needs T = {T} betas, got {values.numel()}")
        if not bool(((values > 0) & (values < 1)).all()):
            raise ValueError("explicit betas must lie in (0, 1)")
        return values
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift and scale sqrt(alpha_bar) so that it keeps its value at t = 0 and is exactly 0 at t = T-1
    (zero terminal SNR: x_{T-1} is pure noise, as sampling assumes), then return the betas of that
    alpha_bar (the last beta is 1). As diffusers' ``rescale_betas_zero_snr``, in float64."""
    ab_sqrt = alphas_cumprod(betas).sqrt()
    a0, aT = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - aT) * (a0 / (a0 - aT))          # keep sqrt(alpha_bar_0), make the last 0
    ab = ab_sqrt**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return alpha_bar / (1.0 - alpha_bar)


# Timestep spacings for sampling with fewer steps than T, as diffusers defines them
# (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2).
SPACINGS = ("leading", "trailing", "linspace")
# Noise-level spacings: n noise levels between the schedule's smallest and largest, mapped to (fractional)
# timesteps by log-sigma interpolation (diffusers' use_karras_sigmas / use_exponential_sigmas).
SIGMA_SPACINGS = ("karras", "exponential")
SPACING_CHOICES = SPACINGS + SIGMA_SPACINGS          # every value of sample.spacing
# Where a step of a timestep grid goes (sample.step_rule): ``listed``, the grid's next timestep (difflo's rule,
# the DDIM paper's sub-sequence); ``stride``, T // n timesteps down (diffusers' DDIMScheduler ``prev_timestep``).
STEP_RULES = ("listed", "stride")
# Where the last step goes (sample.grid_end): ``clean``, the data (t = -1, alpha_bar = 1); ``t0``, timestep 0
# (alpha_bar_0: diffusers' DDIMScheduler with ``set_alpha_to_one: false``).
GRID_ENDS = ("clean", "t0")


def timesteps(T: int, n: int, spacing: str = "trailing", offset: int = 0) -> torch.Tensor:
    """n timesteps in decreasing order, from near T-1 down to near 0 (int64).

    * ``leading``:  ``(arange(n) * (T // n))[::-1] + offset`` (DDIM paper; never reaches T-1; ``offset`` is
      diffusers' ``steps_offset``, >= 0, and must keep the first timestep <= T-1);
    * ``trailing``: ``round(arange(T, 0, -T/n)) - 1`` (starts at T-1);
    * ``linspace``: ``round(linspace(0, T-1, n))[::-1]``.

    The grids are computed in numpy float64 exactly as diffusers does, so the values agree with its
    ``set_timesteps`` everywhere, .5 rounding ties included. One deliberate difference: for 62 values
    of n (61, 103, ...) float64 ``arange(T, 0, -T/n)`` keeps an (n+1)-th element ~1e-13, which
    diffusers turns into a timestep -1; difflo keeps the first n.
    """
    if not 1 <= n <= T:
        raise ValueError(f"number of sampling steps must be between 1 and {T}, got {n}")
    if spacing == "leading":
        top = (n - 1) * (T // n) + offset
        if offset < 0 or top > T - 1:
            raise ValueError(f"steps_offset {offset} does not fit leading spacing with {n} steps: it must be >= 0 "
                             f"and keep the first timestep {top} <= {T - 1}")
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = (np.round(np.arange(T, 0, -T / n)) - 1)[:n]
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return torch.from_numpy(ts.astype(np.int64).copy())


# Noise-level grids. Here sigma is the noise-to-signal ratio sigma_t / alpha_t = sqrt((1 - abar) / abar):
# EDM's and k-diffusion's sigma, diffusers' ``sigmas`` (difflo's sigma_t elsewhere is the VP one).
def ve_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0 .. T-1, increasing (float64 numpy; inf where alpha_bar = 0)."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - ab) / ab)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Eq. 5:
    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0 .. n-1,
    rho = 7 (k-diffusion's get_sigmas_karras without the appended 0)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n noise levels evenly spaced in log sigma from sigma_max to sigma_min (k-diffusion's
    get_sigmas_exponential without the appended 0)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas, alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The (fractional) timesteps of noise levels ``sigmas``: linear interpolation of log sigma between the
    two neighbouring integer timesteps, clipped to [0, T-1] (k-diffusion's DiscreteSchedule.sigma_to_t,
    diffusers' ``_sigma_to_t``, computed the same way so the values agree to the last bit)."""
    log_sigmas = np.log(ve_sigmas(alphas_cumprod))
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    # the last integer timestep whose log sigma is <= log_sigma (diffusers: cumsum(dists >= 0).argmax())
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def log_sigma_at(t: float, alphas_cumprod: torch.Tensor) -> float:
    """log sigma at a fractional timestep t in [0, T-1], the inverse of :func:`sigma_to_t`: linear in t
    between the neighbouring integer timesteps (k-diffusion's DiscreteSchedule.t_to_sigma)."""
    T = alphas_cumprod.shape[0]
    if not 0 <= t <= T - 1:
        raise ValueError(f"timestep {t} is outside 0..{T - 1}")
    low = min(int(math.floor(t)), T - 2)
    w = t - low
    ab_lo, ab_hi = float(alphas_cumprod[low]), float(alphas_cumprod[low + 1])
    ls_lo = 0.5 * math.log((1.0 - ab_lo) / ab_lo)
    if w == 0.0:
        return ls_lo
    if ab_hi == 0.0:                            # zero terminal SNR: the last level is infinite
        return math.inf
    return (1 - w) * ls_lo + w * 0.5 * math.log((1.0 - ab_hi) / ab_hi)


def sigma_timesteps(alphas_cumprod: torch.Tensor, n: int, spacing: str) -> list[float]:
    """n (fractional) timesteps, decreasing from T-1 to 0, whose noise levels follow ``spacing``
    (``karras``: Eq. 5 with rho = 7; ``exponential``: even in log sigma) between the schedule's smallest
    and largest sigma; timesteps within 1e-9 of an integer are that integer (the ends T-1 and 0).
    diffusers' EulerDiscreteScheduler(use_karras_sigmas / use_exponential_sigmas, timestep_spacing="linspace")
    has the same timesteps (as float32) and sigmas."""
    T = alphas_cumprod.shape[0]
    if not 1 <= n <= T:
        raise ValueError(f"number of sampling steps must be between 1 and {T}, got {n}")
    s = ve_sigmas(alphas_cumprod)
    if not math.isfinite(s[-1]):
        raise ValueError(f"spacing {spacing!r} needs a finite largest noise level, but this zero-terminal-SNR "
                         f"schedule is pure noise at t = {T - 1}; use trailing (or leading, linspace)")
    if spacing == "karras":
        sig = karras_sigmas(n, float(s[0]), float(s[-1]))
    elif spacing == "exponential":
        sig = exponential_sigmas(n, float(s[0]), float(s[-1]))
    else:
        raise ValueError(f"unknown noise-level spacing {spacing!r}; choose one of {', '.join(SIGMA_SPACINGS)}")
    t = sigma_to_t(sig, alphas_cumprod)
    snapped = np.round(t)                       # the ends' round trip sigma -> t leaves ~1e-13: T-1 and 0 exactly
    return np.where(np.abs(t - snapped) < 1e-9, snapped, t).tolist()
