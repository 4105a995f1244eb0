"""Likelihood of held-out images in bits per dimension: the variational bound of discrete diffusion,
and the probability-flow ODE with Hutchinson's trace estimator (diffusion and flow).

**Units.** Images are 8-bit: pixel value k in {0..255} is k / 127.5 - 1 in model units, so one bin
is Delta = 2/255 wide and D = C x H x W is the number of dimensions. Both methods give an upper bound
on -log2 P(k) / D, the discrete model's bits per dimension:

* the variational bound ends in a discrete decoder over exactly these bins (no dequantization);
* the ODE gives a continuous density p(x); x is *dequantized* with uniform noise inside k's bin,
  x = (k + u - 1/2) / 127.5 - 1, u ~ U(0, 1)^D, and by Jensen -log P(k) <= E_u[-log p(x)] - D log Delta,
  so (Song et al. 2021, App. D.2; Ho et al. 2019 Flow++ Sec. 3.1 for the bound)

      bits/dim = -log p(x) / (D ln 2) + log2(127.5) = -log p(x) / (D ln 2) + 8 - log2(256 / 127.5).

  (Song et al. put the data on [-1, 1] with bins of 2/256, hence their "+ 7"; difflo's bins are centred
  on the values the model was trained on, 2/255 wide, hence + 6.9944.)

**Estimates and their error.** Every image gets its own estimate (its own noise, timesteps and probe);
the result is the mean over N images with the standard error sd / sqrt(N), which covers both the spread
of the images and the Monte-Carlo noise of the estimator, since the per-image estimates are independent
and unbiased for the expected bound.

**Conditioning.** A class-conditional model is scored as p(x | y) with each image's own label (the
model that guidance scale w = 1 samples), or as p(x) through the null class (``unconditional``);
guided fields (w != 0, 1) are not the score of any one model and are not scored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import data as data_mod
from ..errors import DiffloError
from ..model import make_denoiser
from ..samplers import VARIANCES

BIN_OFFSET = math.log2(127.5)    # -log2 of the bin width 2/255 = 8 - log2(256 / 127.5) = 6.9944
FLOW_DATA_END = 1 / (127.5 * math.sqrt(12))   # the flow ODE's data end: sigma = the dequantization noise's sd


class BatchDraws:
    """Random draws for a batch from one generator (fast; the estimates then depend on the batch)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float64)

    def rand(self, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(high, (n,), generator=self.generator)


class ImageDraws(BatchDraws):
    """One generator per image (seed + index, as ``difflo sample``'s seeds): an image's estimate depends
    on its seed only, never on the batch it was scored in."""

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape) -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float64) for g in self.generators])

    def rand(self, shape) -> torch.Tensor:
        return torch.stack([torch.rand(shape[1:], generator=g, dtype=torch.float64) for g in self.generators])

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators])


@dataclass
class Estimate:
    """Per-image bits/dim (``bpd``) and its parts (each in bits/dim, summing to ``bpd``)."""
    method: str
    bpd: np.ndarray
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = len(self.bpd)
        se = lambda v: float(np.std(v, ddof=1) / math.sqrt(n))
        return {"method": self.method, "bits_per_dim": float(self.bpd.mean()), "standard_error": se(self.bpd),
                "n": n, "parts": {k: {"mean": float(v.mean()), "standard_error": se(v)} for k, v in self.parts.items()},
                **self.settings}


def to_bits(nats: torch.Tensor, dims: int) -> np.ndarray:
    return (nats / (dims * math.log(2))).double().cpu().numpy()


PROBES = ("rademacher", "gaussian")         # Hutchinson probe distributions (ode_log_likelihood)


# -------------------------------------------------------------------------------- variational bound
def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, scale) -> torch.Tensor:
    """Ho et al. 2020, Eq. 13: log P(bin of x) per element under N(mean, scale^2); the bin of
    x = k / 127.5 - 1 is [x - 1/255, x + 1/255], the first one open to -inf and the last to +inf.
    Computed in float64 with log Phi (``log_ndtr``), mirrored to the lower tail where both edges are
    above the mean, so that tiny bin probabilities do not round to 0."""
    x, mean = x.double(), mean.double()
    scale = torch.as_tensor(scale, dtype=torch.float64, device=x.device)
    lo = torch.where(x < -0.999, -math.inf, (x - 1.0 / 255 - mean) / scale)
    hi = torch.where(x > 0.999, math.inf, (x + 1.0 / 255 - mean) / scale)
    flip = lo > 0                                            # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b).clamp(max=1.0 - 1e-16))


def vlb_coefficients(path, variance: str = "fixed_small") -> dict:
    """Ho et al. 2020, Eq. 6-7 (and Sec. 3.2 for the fixed variances), per timestep t = 0..T-1 (difflo's
    index; Ho et al.'s t + 1), float64 (T,): alpha_bar, beta, the posterior q(x_{t-1} | x_t, x0)'s
    variance beta_tilde and mean coefficient of x0 (c_x0), and the reverse model's fixed variance:
    beta_tilde (``fixed_small``) or beta (``fixed_large``). At t = 0 beta_tilde is 0, so the decoder takes beta_tilde of t = 1 for both, as
    improved-diffusion does (its ``posterior_log_variance_clipped`` and ``fixed_large`` table)."""
    if variance not in VARIANCES:
        raise DiffloError(f"unknown reverse variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    T = path.max_steps
    alpha, _ = path.alpha_sigma(torch.arange(T))
    abar = alpha.double() ** 2
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta = 1.0 - abar / abar_prev
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    c_x0 = abar_prev.sqrt() * beta / (1.0 - abar)
    model_var = (post_var if variance == "fixed_small" else beta).clone()
    model_var[0] = post_var[1]
    return {"abar": abar, "beta": beta, "post_var": post_var, "c_x0": c_x0, "model_var": model_var}


def gaussian_kl(mean_diff2: torch.Tensor, var_q, var_p) -> torch.Tensor:
    """KL(N(m_q, var_q) || N(m_p, var_p)) per element, given (m_q - m_p)^2 (broadcasting)."""
    return 0.5 * (torch.log(var_p / var_q) + var_q / var_p - 1.0 + mean_diff2 / var_p)


def strata(T: int, terms: int | None) -> list[np.ndarray]:
    """The KL timesteps 1..T-1 in ``terms`` contiguous strata whose edges are evenly spaced in log t
    (each at least one timestep wide, so the first ones are single timesteps), or all T-1 singletons
    for None or terms >= T-1. Log spacing because the terms fall off about as 1/t (measured on the demo
    model: t = 1: 0.19, t = 10: 0.015, t = 100: 0.0013 bits/dim), so every stratum holds a similar share
    of the sum and the few large small-t terms are always evaluated: with equal strata, 100 terms gave
    per-image estimates off by up to 2x (a stratum of 10 weighting its one draw), 20 terms a typical
    value 30 % below the sum."""
    if terms is None or terms >= T - 1:
        return [np.array([t]) for t in range(1, T)]
    edges = [1]
    for j in range(1, terms + 1):
        e = round(T ** (j / terms))
        edges.append(min(max(e, edges[-1] + 1), T - (terms - j)))
    return [np.arange(a, b) for a, b in zip(edges[:-1], edges[1:])]


@torch.no_grad()
def vlb(denoiser, x0: torch.Tensor, terms: int | None = None, variance: str = "fixed_small",
        draws: BatchDraws | None = None, extra_args: dict | None = None) -> dict[str, torch.Tensor]:
    """Ho et al. 2020, Eq. 5 (Sec. 3.3), per image in nats: the negative variational bound
    L = L_T + sum_{t>1} L_{t-1} + L_0 in difflo's indices,

        prior     KL(q(x_{T-1} | x0) || N(0, I))                                      (no network)
        diffusion sum_{t=1}^{T-1} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), x_t ~ q(x_t | x0)
        decoder   -log p(x0 | x_0), the discretized Gaussian of Eq. 13 around x0_hat(x_0, 0),

    where p(x_{t-1} | x_t) = N(c_x0 x0_hat + c_xt x_t, model_var) shares q's coefficient of x_t, so its
    mean differs from q's by c_x0 (x0 - x0_hat). Each KL term is one sample of x_t. ``terms``: None
    sums all T-1 KL terms; K < T-1 splits 1..T-1 into K contiguous strata (:func:`strata`, evenly
    spaced in log t) and evaluates one timestep drawn uniformly in each stratum, weighted by the
    stratum's size (stratified sampling, uniform within a stratum: an unbiased estimate of the sum,
    drawn afresh for every image). ``x0`` (B, C, H, W) are bin centres
    k / 127.5 - 1; ``denoiser(x, t, **extra_args)`` takes per-image times (:mod:`difflo.guidance`), e.g.
    ``extra_args = {"y": labels}``; ``draws`` gives the timesteps and noise."""
    path, extra_args = denoiser.path, extra_args or {}
    if not vlb_applies(path):
        raise DiffloError("the variational bound needs a discrete diffusion model (DDPM's Markov chain over "
                          "timesteps); this model is a continuous-time flow: use --method ode")
    c = {k: v.to(x0.device) for k, v in vlb_coefficients(path, variance).items()}
    draws = draws or BatchDraws()
    x0 = x0.double()
    B, T = x0.shape[0], path.max_steps
    per_pixel = lambda v: v.reshape(B, -1).sum(1)
    noise = lambda: draws.randn(x0.shape).to(x0.device)
    bcast = lambda v: v.reshape(-1, *([1] * (x0.ndim - 1)))

    a2 = c["abar"][T - 1]
    prior = per_pixel(gaussian_kl(a2 * x0 ** 2, 1.0 - a2, torch.ones_like(a2)))

    diffusion = x0.new_zeros(B)
    for stratum in strata(T, terms):
        pick = draws.randint(len(stratum), B)
        t = torch.as_tensor(stratum)[pick].to(x0.device)                          # (B,) one timestep per image
        ab = bcast(c["abar"][t])
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise()
        diff2 = (bcast(c["c_x0"][t]) * (x0 - denoiser(x_t, t, **extra_args))) ** 2
        kl = per_pixel(gaussian_kl(diff2, bcast(c["post_var"][t]), bcast(c["model_var"][t])))
        diffusion += len(stratum) * kl

    t0 = torch.zeros(B, dtype=torch.long, device=x0.device)
    x_first = c["abar"][0].sqrt() * x0 + (1.0 - c["abar"][0]).sqrt() * noise()
    x0_first = denoiser(x_first, t0, **extra_args)
    decoder = -per_pixel(discretized_gaussian_log_likelihood(x0, x0_first, c["model_var"][0].sqrt()))
    return {"prior": prior, "diffusion": diffusion, "decoder": decoder}


# ------------------------------------------------------------------------ probability-flow ODE
LOG_SNR_FLOOR = -4.0    # below lambda = -4 (alpha/sigma < 0.018) one step reaches the noise end (see ode_times)


def log_snr(path, t) -> float:
    """lambda = log(alpha_t / sigma_t) (-inf at pure noise)."""
    a, s = (float(c) for c in path.alpha_sigma(t))
    return math.log(a / s) if a > 0 else -math.inf


def ode_times(path, steps: int) -> list:
    """The ODE's time grid from the data end to the noise end: at most ``steps`` + 1 times.

    The data end is the path's first noise level with sigma > 0: timestep 0 for discrete diffusion,
    t = ``FLOW_DATA_END`` for flow. The grid is uniform in the log signal-to-noise ratio lambda from
    there down to ``LOG_SNR_FLOOR``, then one step to the noise end (``path.sampling_times(1)[0]``:
    T-1, or t = 1 where alpha = 0). Uniform in lambda because for data of variance v the flow in
    (z, r) bends where r ~ 1/sqrt(v), a band about one unit of lambda wide for each v (for Gaussian
    data z(r) = r mu + c sqrt(1 + v r^2)); below the floor the flow of data with v <= 1 is straight to
    within r^2 < 3e-4. A discrete path takes the nearest timestep to each lambda, without repeats."""
    if steps < 2:
        raise DiffloError(f"--steps must be at least 2 (the last step goes to pure noise), got {steps}")
    noise_end = path.sampling_times(1)[0]
    continuous = path.continuous
    data_end = FLOW_DATA_END if continuous else 0
    lam_data, lam_noise = log_snr(path, data_end), log_snr(path, noise_end)
    targets = np.linspace(lam_data, max(lam_noise, LOG_SNR_FLOOR), steps)
    if continuous:
        times = [_time_of(path, lam, data_end, noise_end) for lam in targets]
    else:
        lams = np.array([log_snr(path, t) for t in range(path.max_steps)])          # decreasing in t
        times = [int(np.abs(lams - lam).argmin()) for lam in targets]
    times = [data_end] + [t for t in times[1:] if t != noise_end] + [noise_end]
    return list(dict.fromkeys(times))                                                # without repeats, in order


def _time_of(path, lam: float, lo: float, hi: float) -> float:
    """The time in [lo, hi] of a continuous path where log(alpha/sigma) = lam (bisection; lambda decreases)."""
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_snr(path, mid) > lam else (lo, mid)
    return 0.5 * (lo + hi)


def _field(denoiser, z: torch.Tensor, t, sigma: float, probe: torch.Tensor, extra_args: dict
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """dz/dr = x0_hat(sigma z, t) and Hutchinson's estimate of its divergence in z,
    sigma probe^T (d x0_hat / dx) probe (one vector-Jacobian product, with autograd on here whatever the
    caller's mode: the denoiser leaves gradients to its caller)."""
    tt = torch.full((z.shape[0],), t, dtype=torch.long if isinstance(t, int) else torch.float64, device=z.device)
    with torch.enable_grad():
        x = (sigma * z).detach().requires_grad_(True)
        x0 = denoiser(x, tt, **extra_args)
        (vjp,) = torch.autograd.grad((x0 * probe).sum(), x)
    div = sigma * (vjp * probe).reshape(len(z), -1).sum(1)
    return x0.detach(), div.detach()


def _trapezoid(r: float, r_next: float, div: torch.Tensor, div_next: torch.Tensor) -> torch.Tensor:
    """integral_r^r_next div dr by the trapezoidal rule in lambda = log r (of the integrand r div), or in r
    on the last step to r = 0. Near the data end x0_hat ~ x / alpha, so div ~ D / r: constant in lambda,
    where the rule is exact, while the rule in r errs by about D h^3 / 6 per step, h = the step in
    lambda (measured on Gaussian data with the integer timesteps of a cosine schedule: -0.19 nats of bias
    in 16 dimensions with the rule in r, none found with the rule in lambda)."""
    if r_next <= 0.0:
        return (r_next - r) * 0.5 * (div + div_next)
    return math.log(r_next / r) * 0.5 * (r * div + r_next * div_next)


@torch.no_grad()
def ode_log_likelihood(denoiser, x: torch.Tensor, ts: list, draws: BatchDraws | None = None,
                       probe: str = "rademacher", extra_args: dict | None = None) -> dict[str, torch.Tensor]:
    """Song et al. 2021, Eq. 13 and App. D.2: log p(x) per image (nats) of the probability-flow ODE,
    log p_0(x(0)) = log p_T(x(T)) + integral of div f over the trajectory, the divergence by the
    Skilling-Hutchinson estimator E[v^T (df/dx) v] with one probe v per image (Rademacher or Gaussian,
    kept for the whole trajectory).

    The ODE is integrated in z = x / sigma against r = alpha / sigma (the data-prediction form
    DPM-Solver++ uses): for every Gaussian path x_t = alpha x0 + sigma eps its probability flow is
    dz/dr = x0_hat(sigma z, t), smooth at both ends (r = 0 is the flow path's pure noise; r is large
    but finite at the data end), with Heun's method over the grid ``ts`` (data end first) and the
    trapezoidal rule in log r for the log-density (:func:`_trapezoid`). Then, with z_T at the noise end and D dimensions,

        log p(x) = log N(sigma_T z_T; 0, I) + D log sigma_T + integral_{r_data}^{r_T} div_z(dz/dr) dr
                   - D log sigma_data

    (the two log sigma terms are the Jacobians of x -> z at either end). ``x`` (B, C, H, W) is the
    state at ``ts[0]`` (the dequantized data); ``denoiser(x, t, **extra_args)`` takes per-image times."""
    path, draws, extra_args = denoiser.path, draws or BatchDraws(), extra_args or {}
    z = x.double()
    B, dims = z.shape[0], z[0].numel()
    if probe == "rademacher":
        v = torch.where(draws.rand(z.shape) < 0.5, -1.0, 1.0).to(z.device, torch.float64)
    elif probe == "gaussian":
        v = draws.randn(z.shape).to(z.device)
    else:
        raise DiffloError(f"unknown Hutchinson probe {probe!r}; choose {' or '.join(PROBES)}")
    coef = [tuple(float(c) for c in path.alpha_sigma(t)) for t in ts]
    sigma0 = coef[0][1]
    z = z / sigma0
    integral = z.new_zeros(B)
    h, div = _field(denoiser, z, ts[0], sigma0, v, extra_args)
    for i in range(len(ts) - 1):
        (a, s), (a_next, s_next) = coef[i], coef[i + 1]
        dr = a_next / s_next - a / s
        z_pred = z + dr * h
        h_next, div_next = _field(denoiser, z_pred, ts[i + 1], s_next, v, extra_args)
        z = z + dr * 0.5 * (h + h_next)                                     # Heun
        integral += _trapezoid(a / s, a_next / s_next, div, div_next)
        if i + 2 < len(ts):
            h, div = _field(denoiser, z, ts[i + 1], s_next, v, extra_args)
    sigma_T, prior_std = coef[-1][1], path.prior_std           # the prior N(0, prior_std^2 I): EDM's sigma_max
    x_T = sigma_T * z
    prior = -0.5 * ((x_T / prior_std).reshape(B, -1) ** 2).sum(1) - 0.5 * dims * math.log(2 * math.pi)
    jacobian = dims * (math.log(sigma_T) - math.log(sigma0) - math.log(prior_std))
    return {"prior": prior, "divergence": integral, "jacobian": jacobian + integral.new_zeros(B)}


# -------------------------------------------------------------------------------- a model's images
METHODS = ("vlb", "ode")
METHOD_OPTIONS = {"vlb": ("terms", "variance"), "ode": ("steps", "probe")}   # the options of :func:`estimate` each reads
STEPS = 50          # ODE steps (Heun: 2 network evaluations + vector-Jacobian products each)
TERMS = 100         # KL terms of the variational bound evaluated per image (of T - 1)
N_IMAGES = 16


def vlb_applies(path) -> bool:
    """The variational bound needs DDPM's discrete Markov chain: a variance-preserving discrete path."""
    return path.variance_preserving and not path.continuous


def methods_for(path, method: str | None) -> list[str]:
    """``method``: vlb, ode, both, or None (the variational bound for discrete diffusion, the ODE for flow)."""
    if method is None:
        return ["vlb" if vlb_applies(path) else "ode"]
    chosen = list(METHODS) if method == "both" else [method]
    if any(m not in METHODS for m in chosen):
        raise DiffloError(f"--method must be vlb, ode or both, got {method!r}")
    if "vlb" in chosen and not vlb_applies(path):
        raise DiffloError("--method vlb: the variational bound needs a discrete diffusion model (DDPM's Markov "
                          "chain over timesteps); this is a flow model: use --method ode")
    return chosen


def check_method_options(methods, given) -> None:
    """A one-line DiffloError for the first option of ``given`` (names a user set, e.g. ``terms``) that
    none of ``methods`` reads (METHOD_OPTIONS)."""
    for option in given:
        if not any(option in METHOD_OPTIONS[m] for m in methods):
            users = [m for m in METHODS if option in METHOD_OPTIONS[m]]
            raise DiffloError(f"--{option} has no effect with --method {'/'.join(methods)}; it is used by "
                              f"--method {', '.join(users)}")


def check_terms(path, terms: int | None) -> int | None:
    """``terms`` KL terms of the variational bound that a user asked for: None (all) or 1..T-1 for a model
    of T timesteps (the default, TERMS, means all of fewer)."""
    T = path.max_steps
    if terms is not None and not 1 <= terms <= T - 1:
        raise DiffloError(f"--terms {terms}: this model has {T - 1} KL terms (t = 1..{T - 1} of its "
                          f"diffusion.timesteps={T}); give 1..{T - 1}, or all")
    return terms


def held_out(model, n: int, split: str = "test", seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """n images (uint8 (n, H, W, C)) and labels of ``split`` of the model's data set, a seeded random
    choice (the same images for every method and model at one seed), and a description."""
    if n < 2:
        raise DiffloError(f"--n {n}: the likelihood needs at least 2 images (the standard error is over images)")
    d = model.cfg.data
    ds = data_mod.load_split(d, split)
    if n > len(ds):
        raise DiffloError(f"--n {n}: {d.name}/{split} has only {len(ds)} images")
    shape = (model.cfg.model.image_size, model.cfg.model.image_size, model.cfg.model.in_channels)
    if tuple(ds.images.shape[1:]) != shape:
        raise DiffloError(f"{d.name}/{split} images are {'x'.join(map(str, ds.images.shape[1:]))}, the model's "
                          f"{'x'.join(map(str, shape))}")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return np.asarray(ds.images[idx]), np.asarray(ds.labels[idx]), f"{split} images of {d.name}"


def _labels(model, labels: np.ndarray, unconditional: bool) -> tuple[torch.Tensor | None, str]:
    if model.num_classes == 0:
        return None, "log p(x) (unconditional model)"
    if unconditional:
        if not model.has_null_class:
            raise DiffloError("--unconditional needs the model's null class (for a diffusers model give "
                              "--null-class K)")
        return torch.full((len(labels),), model.num_classes, dtype=torch.long), "log p(x) through the null class"
    return torch.as_tensor(labels, dtype=torch.long), "log p(x | y) with each image's own label"


def estimate(model, images: np.ndarray, labels: np.ndarray, method: str, *, steps: int = STEPS,
             terms: int | None = TERMS, variance: str = "fixed_small", probe: str = "rademacher",
             unconditional: bool = False, seed: int = 0, batch_size: int = 50, progress=None) -> Estimate:
    """Bits per dimension of uint8 (N, H, W, C) images under ``model`` by ``method`` (vlb or ode). Image i
    draws its noise, timesteps, dequantization and probe from seed + i. Runs the network in float32
    (no autocast: likelihoods need the precision) with its weights frozen (requires_grad off)."""
    path = model.path
    methods_for(path, method)
    if terms is not None and terms < 1:
        raise DiffloError(f"--terms must be at least 1 (or all), got {terms}")
    model.net.requires_grad_(False)             # the ODE differentiates in x only
    device = model.device
    y_all, conditioning = _labels(model, labels, unconditional)
    n, dims = len(images), int(np.prod(images.shape[1:]))
    ts = ode_times(path, steps) if method == "ode" else None
    # The model's one denoiser (guidance scale 1: the labels given, or the null class), x0_hat in float64:
    # clamped to the data range for the variational bound's decoder means, unclamped for the ODE's field.
    den = make_denoiser(model, 1.0, clip_x0=method == "vlb", dtype=torch.float64)
    bpd, parts = [], {}
    for i in range(0, n, batch_size):
        k = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2).double()
        y = None if y_all is None else y_all[i:i + batch_size].to(device)
        draws = ImageDraws(range(seed + i, seed + i + len(k)))
        if method == "vlb":
            nats = vlb(den, (k / 127.5 - 1.0).to(device), terms, variance, draws, {"y": y})
            part_bits = {name: to_bits(v, dims) for name, v in nats.items()}
            bpd.append(sum(part_bits.values()))
        else:
            x = ((k + draws.rand(k.shape) - 0.5) / 127.5 - 1.0).to(device)          # uniform dequantization
            logp = ode_log_likelihood(den, x, ts, draws, probe, {"y": y})
            part_bits = {"prior": -to_bits(logp["prior"], dims),
                         "volume": -to_bits(logp["divergence"] + logp["jacobian"], dims)}
            bpd.append(part_bits["prior"] + part_bits["volume"] + BIN_OFFSET)
        for name, v in part_bits.items():
            parts.setdefault(name, []).append(v)
        if progress is not None:
            progress.update(len(k))
    settings = {"dims": dims, "conditioning": conditioning, "seed": seed}
    if method == "vlb":
        T = path.max_steps
        settings.update(kl_terms=len(strata(T, terms)), kl_terms_of=T - 1, variance=variance,
                        clip_x0=model.cfg.diffusion.clip_range, network_evaluations=len(strata(T, terms)) + 1)
    else:
        settings.update(steps=len(ts) - 1, data_end=ts[0], network_evaluations=2 * (len(ts) - 1), probe=probe,
                        bin_offset=BIN_OFFSET)
    return Estimate(method, np.concatenate(bpd), {k: np.concatenate(v) for k, v in parts.items()}, settings)


def format_estimate(res: dict, images: str) -> str:
    """Two lines: the estimate with N and its standard error and how it was made; its parts."""
    head = f"[N={res['n']} {images}, {res['conditioning']}"
    if res["method"] == "vlb":
        sampled = ("all" if res["kl_terms"] == res["kl_terms_of"] else
                   f"{res['kl_terms']} of the") + f" {res['kl_terms_of']} KL terms"
        how = (f"{sampled} (one timestep drawn uniformly in each of {res['kl_terms']} strata evenly spaced in "
               f"log t, weighted by the stratum's size)" if res["kl_terms"] < res["kl_terms_of"] else sampled)
        line = (f"NLL, variational bound (Ho et al. 2020, Eq. 5; discretized decoder): {res['bits_per_dim']:.4f} "
                f"+- {res['standard_error']:.4f} bits/dim  {head}; {how}; reverse variance {res['variance']}, "
                f"x0 clipped to +-{res['clip_x0']:g}]")
    else:
        line = (f"NLL, probability-flow ODE (Song et al. 2021, App. D.2): {res['bits_per_dim']:.4f} +- "
                f"{res['standard_error']:.4f} bits/dim  {head}; Heun, {res['steps']} steps uniform in log-SNR from "
                f"t={res['data_end']:g} ({res['network_evaluations']} network evaluations with a vector-Jacobian "
                f"product each), one {res['probe']} Hutchinson probe per image; uniform dequantization, "
                f"bits = -log p / (D ln 2) + log2(127.5) ({res['bin_offset']:.4f})]")
    parts = ", ".join(f"{k} {v['mean']:.4f}" for k, v in res["parts"].items())
    return f"{line}\n  parts (bits/dim, mean over images): {parts}; +- is the standard error over the N images"
