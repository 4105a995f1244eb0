"""EDM: the variance-exploding path with Karras et al.'s preconditioning, loss and time grid.

Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Table 1 ("Ours" column) and Sec. 5:

* **Path** (Eq. 1 with s(t) = 1, sigma(t) = t): ``x = x0 + sigma eps``; difflo's ``alpha = 1``,
  ``sigma = t``, the time axis is sigma itself and the clean end is ``t = 0``. The path is continuous, so
  difflo's Euler and Heun (Algorithms 1 and 2: ``samplers._edm_loop``) are EDM's own samplers on it, and
  every sampler written in alpha and sigma (DDIM, DPM-Solver++, ...) runs on it; DDPM's posterior needs a
  variance-preserving path and is refused by its registry entry.
* **Preconditioning** (Table 1; Eq. 7): ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with
  ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
  ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4`` (sd = sigma_data = 0.5). difflo's
  UNet is F; it sees ``c_in x`` (:meth:`EDMPath.network_input`) and ``1000 c_noise = 250 ln(sigma)``
  (:meth:`EDMPath.model_time`: c_noise on the per-mille scale the flow path gives its time, so the
  sinusoidal embedding's frequencies resolve it as they resolve diffusion timesteps; sigma in
  [0.002, 80] is -1554 .. 1095), and the denoiser returns D itself (:meth:`EDMPath.x0_hat`; prediction
  ``edm``).
* **Training** (Table 1; Eq. 8): ``ln sigma ~ N(P_mean, P_std^2)`` (-1.2, 1.2) and the loss
  ``lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2`` with ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``.
  Since ``lambda c_out^2 = 1`` this is the plain MSE of F against ``(x0 - c_skip x) / c_out``, a target
  of unit variance for data of standard deviation sd (Eq. 8's "effective training target").
* **Sampling grid** (Eq. 5): ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho``, rho = 7, sigma_min = 0.002, sigma_max = 80, then 0; the noise x at sigma_max
  is ``sigma_max z`` (:attr:`EDMPath.prior_std`; EDM's Algorithm 1, line 1).
"""
from __future__ import annotations

import inspect
import math

import torch

from .diffusion import per_sample, training_noise
from .samplers import fitting
from .schedules import SIGMA_SPACINGS, exponential_sigmas, karras_sigmas

C_NOISE_SCALE = 1000.0         # the network's time is 1000 c_noise (the flow path's 1000 t)


class EDMPath:
    """alpha = 1, sigma = t (variance exploding), with EDM's preconditioning, loss and grid.
    Implements :class:`difflo.noise_paths.NoisePath`."""

    t_clean = 0.0
    variance_preserving = False  # alpha = 1: no DDPM posterior
    continuous = True            # d alpha/dt = 0, d sigma/dt = 1: Euler and Heun are EDM's Algorithms 1 and 2
    beta_schedule = False        # no betas: zero_terminal_snr and diffusers' DDPM schedulers do not apply
    timestep_grids = False       # a grid in sigma: steps_offset, step_rule and grid_end stay 0, listed, clean
    max_steps = None
    cli_scale = 1000             # --t k is the noise level k/1000 of the way along Karras' rho-ramp
    spacings = SIGMA_SPACINGS    # karras (Eq. 5) or exponential (even in log sigma), sigma_max to sigma_min
    predictions = ("edm",)       # F of the preconditioned denoiser D = c_skip x + c_out F
    loss_weightings = ("none",)  # EDM's lambda(sigma) is the objective itself (lambda c_out^2 = 1 on F)
    t_samplings = ("log_normal",)   # ln sigma ~ N(p_mean, p_std^2)

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not (sigma_data > 0 and p_std > 0 and 0 < sigma_min < sigma_max and rho > 0):
            raise ValueError(f"EDM needs sigma_data > 0, p_std > 0, 0 < sigma_min < sigma_max and rho > 0; got "
                             f"sigma_data={sigma_data}, p_std={p_std}, sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}, rho={rho}")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    @classmethod
    def from_config(cls, d) -> "EDMPath":
        return cls(**{k: getattr(d, k) for k in DEFAULTS})

    @staticmethod
    def max_steps_for(d) -> None:
        return None

    @classmethod
    def describe(cls, d) -> str:
        """The objective in words: ``edm, sigma_data 0.5, edm-prediction``."""
        return f"{d.objective}, sigma_data {d.sigma_data:g}, {d.prediction}-prediction"

    @property
    def prior_std(self) -> float:
        """The noise at the grid's start is sigma_max z (EDM's Algorithm 1, line 1)."""
        return self.sigma_max

    # ------------------------------------------------------------------ Table 1's coefficients
    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5

    def c_in(self, sigma):
        return 1.0 / (sigma**2 + self.sigma_data**2) ** 0.5

    @staticmethod
    def c_noise(sigma):
        return torch.log(sigma) / 4 if isinstance(sigma, torch.Tensor) else math.log(sigma) / 4

    def loss_weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Table 1), = 1 / c_out^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    # ------------------------------------------------------------------ the path
    def alpha_sigma(self, t):
        if isinstance(t, (int, float)):
            return 1.0, float(t)
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.ones_like(t), t

    def d_alpha_sigma(self, t):
        """(d alpha/dt, d sigma/dt) = (0, 1): the ODE is dx/dsigma = (x - D) / sigma (EDM's Eq. 4 with s = 1)."""
        return 0.0, 1.0

    def time_at_nsr(self, nsr: float) -> float:
        """sigma / alpha = sigma: the time is the noise-to-signal ratio itself."""
        return float(nsr)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """1000 c_noise = 250 ln(sigma), float32 (see the module docstring)."""
        return (C_NOISE_SCALE * self.c_noise(t.to(torch.float64))).to(torch.float32)

    def network_input(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """c_in x: unit variance at every sigma for data of standard deviation sigma_data."""
        return per_sample(self.c_in(sigma), x) * x

    def x0_hat(self, output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F (Eq. 7)."""
        if prediction not in self.predictions:
            raise ValueError(f"an EDM network predicts {', '.join(self.predictions)}, not {prediction!r}")
        return per_sample(self.c_skip(sigma), x) * x + per_sample(self.c_out(sigma), x) * output

    # ------------------------------------------------------------------ grids
    def ramp_sigma(self, u: float) -> float:
        """The noise level a fraction u in [0, 1] along Eq. 5's rho-ramp (u = 1: sigma_max, u = 0: sigma_min)."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + u * (hi - lo)) ** self.rho

    def sampling_times(self, n: int, spacing: str = "karras", offset: int = 0, step_rule: str = "listed",
                       end: str = "clean") -> list[float]:
        """n noise levels from sigma_max to sigma_min (``karras``: Eq. 5; ``exponential``: even in log sigma),
        then 0: n + 1 times. The diffusion timestep grids' spacings and settings are refused."""
        if n < 1:
            raise ValueError(f"number of sampling steps must be >= 1, got {n}")
        if (offset, step_rule, end) != (0, "listed", "clean"):
            raise ValueError(f"steps_offset={offset}, step_rule={step_rule} and grid_end={end} are settings of "
                             f"diffusion timestep grids; an EDM model's grid takes 0, listed and clean")
        if spacing == "karras":
            sigmas = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)
        elif spacing == "exponential":
            sigmas = exponential_sigmas(n, self.sigma_min, self.sigma_max)
        else:
            raise ValueError(f"spacing {spacing!r} does not apply to EDM models: their grid is in sigma; use "
                             f"{' or '.join(SIGMA_SPACINGS)} (sample.spacing / --spacing)")
        sigmas = [float(s) for s in sigmas]
        sigmas[0] = self.sigma_max                    # exact ends (the float power leaves ~1e-14)
        if n > 1:
            sigmas[-1] = self.sigma_min
        return sigmas + [self.t_clean]

    def strided_times(self, stride: int) -> list[float]:
        """The noise levels at per-mille k * stride along the rho-ramp (:meth:`ramp_sigma`), noisiest first, then 0."""
        return [self.ramp_sigma(k * stride / 1000.0) for k in range(1000 // stride, 0, -1)] + [self.t_clean]

    def time_from_cli(self, t: float) -> float:
        """A command-line time in (0, 1000]: the noise level t/1000 along the rho-ramp (1000: sigma_max)."""
        if not 0 < t <= 1000:
            raise ValueError(f"timestep {t:g} out of range: for EDM models give t in (0, 1000] (per mille of "
                             f"the noise-level ramp, 1000 = sigma_max {self.sigma_max:g})")
        return self.ramp_sigma(t / 1000.0)

    @property
    def samplers(self) -> tuple[str, ...]:
        return fitting(self)

    # ------------------------------------------------------------------ training
    def sample_sigma(self, B: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B,) training noise levels, float64: ln sigma ~ N(p_mean, p_std^2) (Table 1)."""
        device = generator.device if generator is not None else "cpu"
        n = torch.randn(B, generator=generator, device=device, dtype=torch.float64)
        return torch.exp(self.p_mean + self.p_std * n)

    def training_loss(self, net, x0, y, d, generator=None, rows: slice = slice(None),
                      offset_noise: float = 0.0) -> torch.Tensor:
        """EDM's loss (Eq. 8 with Table 1's lambda): sigma ~ p(sigma), n ~ N(0, I) (plus offset noise,
        :func:`difflo.diffusion.training_noise`), x = x0 + sigma n, loss = lambda(sigma) ||D(x; sigma) - x0||^2
        = ||F(c_in x; c_noise) - (x0 - c_skip x) / c_out||^2 (mean over pixels). ``rows``: as for
        :func:`difflo.diffusion.training_loss` (draws for the whole batch, loss over these rows)."""
        sigma = self.sample_sigma(x0.shape[0], generator).to(x0.device)
        eps = training_noise(x0, generator, offset_noise)
        x0, y, sigma, eps = x0[rows], y[rows] if y is not None else None, sigma[rows], eps[rows]
        x = x0 + per_sample(sigma, x0) * eps                                        # (B, C, H, W)
        out = net(self.network_input(x, 1.0, sigma), self.model_time(sigma), y)
        target = (x0 - per_sample(self.c_skip(sigma), x0) * x) / per_sample(self.c_out(sigma), x0)
        return (out.float() - target.float()).pow(2).mean()


# The diffusion.* keys only this objective reads, with EDM's values (Table 1; Eq. 5): EDMPath's arguments.
DEFAULTS = {k: p.default for k, p in inspect.signature(EDMPath.__init__).parameters.items() if k != "self"}
