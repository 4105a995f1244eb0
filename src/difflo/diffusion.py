"""The DDPM forward process, its three parameterizations, and their training losses.

Conventions (pinned by ``tests/unit/test_diffusion.py``):

* Discrete time ``t = 0 .. T-1``; **t = 0 is data, t = T-1 is noise**; ``t = -1`` is the clean
  data itself (alpha = 1, sigma = 0). See :mod:`difflo.schedules`. A fractional t (the noise-level
  grids ``karras`` and ``exponential``) interpolates log(sigma_t / alpha_t) linearly between the two
  neighbouring timesteps, as k-diffusion and diffusers' EulerDiscreteScheduler do.
* A Gaussian path ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t = sqrt(alpha_bar_t)`` and
  ``sigma_t = sqrt(1 - alpha_bar_t)`` (Ho et al. 2020, Eq. 4). Every sampler in
  :mod:`difflo.samplers` is written against ``alpha_t, sigma_t`` alone, so the same sampler code
  serves any path of this form.
* The network predicts one of (Salimans & Ho 2022, "Progressive Distillation", Sec. 4 and App. D):
  ``eps`` (the noise), ``x0`` (the data), or ``v = alpha_t eps - sigma_t x0`` (the velocity).
  The conversions below are exact inverses of each other given ``x_t``.
* For flow matching (:mod:`difflo.flow`, alpha_t = 1 - t, sigma_t = t) the network predicts
  ``u = eps - x0 = dx_t/dt``; its conversions below hold on that path (alpha + sigma = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from . import schedules
from .samplers import TimeGrid, fitting

PREDICTIONS = ("eps", "x0", "v", "u")
LOSS_WEIGHTINGS = ("none", "min_snr")


class UnscaledNetwork:
    """The network's side of a path whose x_t has about unit scale (DDPM's and the flow path): the network
    sees x_t as it is, its output is read by :func:`to_x0`, and sampling starts from N(0, I). (EDM's
    preconditioning, :class:`difflo.edm.EDMPath`, scales all three.)"""

    prior_std = 1.0               # the noise x at the grid's noise end is z ~ N(0, I)

    def network_input(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        return x

    def x0_hat(self, output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
        return to_x0(output, x, alpha, sigma, prediction)


@dataclass(frozen=True, eq=False)
class DiscreteSchedule(UnscaledNetwork):
    """alpha_bar_t for t = 0 .. T-1 (float64), and the path coefficients alpha_t, sigma_t.
    Implements :class:`difflo.noise_paths.NoisePath`."""

    alphas_cumprod: torch.Tensor  # (T,) float64
    t_clean = -1                  # the time of the clean data, where every sampler ends
    variance_preserving = True    # alpha^2 + sigma^2 = 1: DDPM's posterior applies
    continuous = False            # no d alpha/dt: Euler/Heun in t do not apply
    beta_schedule = True          # zero_terminal_snr rescales it; diffusers' DDPMScheduler expresses it
    timestep_grids = True         # sampling grids of timesteps: steps_offset, step_rule, grid_end apply
    predictions = ("eps", "x0", "v")              # what the network may be trained to predict
    loss_weightings = LOSS_WEIGHTINGS
    t_samplings = ("uniform",)                    # training times: t ~ U{0..T-1}

    @classmethod
    def from_config(cls, d) -> "DiscreteSchedule":
        """The schedule of a DiffusionConfig (``schedule``, ``timesteps``; ``beta_start``/``beta_end``
        for linear and scaled_linear, ``betas`` for explicit; ``zero_terminal_snr`` rescales it so that
        alpha_bar_{T-1} = 0, Lin et al. 2024, Algorithm 1)."""
        betas = schedules.get_betas(d.schedule, d.timesteps, d.beta_start, d.beta_end, d.betas)
        if getattr(d, "zero_terminal_snr", False):
            betas = schedules.rescale_zero_terminal_snr(betas)
        return cls(schedules.alphas_cumprod(betas))

    @staticmethod
    def max_steps_for(d) -> int:
        return d.timesteps

    @classmethod
    def describe(cls, d) -> str:
        """The objective in words: ``diffusion, cosine, eps-prediction``."""
        return f"{d.objective}, {d.schedule}, {d.prediction}-prediction"

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> "DiscreteSchedule":
        return cls(schedules.alphas_cumprod(schedules.get_betas(name, T)))

    @property
    def T(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_bar(self, t):
        """alpha_bar at timestep(s) t; t = -1 gives 1 (clean data); a fractional t is interpolated
        (see :meth:`alpha_sigma`)."""
        if isinstance(t, (int, float)):
            if t < 0:
                return 1.0
            if float(t).is_integer():
                return float(self.alphas_cumprod[int(t)])
            return self.alpha_sigma(t)[0] ** 2
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not bool((t == t.round()).all()):
                return torch.tensor([self.alpha_bar(float(v)) for v in t.flatten()],
                                    dtype=torch.float64, device=t.device).reshape(t.shape)
            t = t.long()
        ab = self.alphas_cumprod.to(t.device)[t.clamp(min=0)]
        return torch.where(t < 0, torch.ones_like(ab), ab)

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)); floats for a Python number t,
        float64 tensors for a tensor t. A fractional t in (0, T-1) has the noise level whose log(sigma/alpha)
        is linear between its neighbouring timesteps (:func:`difflo.schedules.log_sigma_at`)."""
        if isinstance(t, float) and t > 0 and not t.is_integer():
            ls = schedules.log_sigma_at(t, self.alphas_cumprod)       # log(sigma_t / alpha_t)
            r = math.exp(-abs(ls))                                     # <= 1: no overflow either way
            norm = (1.0 + r * r) ** 0.5
            return (r / norm, 1.0 / norm) if ls > 0 else (1.0 / norm, r / norm)
        ab = self.alpha_bar(t)
        if isinstance(ab, float):
            return ab ** 0.5, (1.0 - ab) ** 0.5
        return ab.sqrt(), (1.0 - ab).sqrt()

    def d_alpha_sigma(self, t):
        """A discrete schedule has no time derivative (``continuous`` is False)."""
        raise ValueError("a discrete diffusion schedule has no d alpha/dt: euler/heun integrate a continuous-time "
                         "path (objective: flow); use ddim or ddpm")

    def time_at_nsr(self, nsr: float) -> float:
        """The (fractional) timestep where sigma_t / alpha_t = nsr (:func:`difflo.schedules.sigma_to_t`)."""
        return float(schedules.sigma_to_t(nsr, self.alphas_cumprod))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value the network is conditioned on: the timestep index itself."""
        return t.to(torch.float32)

    @property
    def max_steps(self) -> int:
        return self.T

    @property
    def cli_scale(self) -> int:
        """Command-line times are the timesteps themselves, 0..T-1."""
        return self.T

    @property
    def spacings(self) -> tuple[str, ...]:
        """The spacings this schedule's grids can have: the noise-level ones need a finite largest sigma
        (not a zero-terminal-SNR schedule)."""
        return schedules.SPACING_CHOICES if float(self.alphas_cumprod[-1]) > 0 else schedules.SPACINGS

    def sampling_times(self, n: int, spacing: str = "trailing", offset: int = 0, step_rule: str = "listed",
                       end: str = "clean") -> list:
        """n timesteps of ``spacing``, then the end: integers for the timestep spacings
        (:func:`difflo.schedules.timesteps`), fractional timesteps for the noise-level spacings ``karras``
        and ``exponential`` (:func:`difflo.schedules.sigma_timesteps`).

        * ``offset``: leading spacing's ``steps_offset`` (the other spacings have none);
        * ``end`` (:data:`~difflo.schedules.GRID_ENDS`): ``clean``, the clean end -1 (alpha_bar = 1), or
          ``t0``, timestep 0 (alpha_bar_0; diffusers' ``set_alpha_to_one: false``); from a grid that already
          ends at timestep 0 the last step then stays there (an identity step for DDIM, as in diffusers);
        * ``step_rule`` (:data:`~difflo.schedules.STEP_RULES`): ``listed``, each step goes to the next time;
          ``stride``, each step from timestep t goes to t - T // n, or to the end where that is below 0
          (diffusers' DDIMScheduler), and the network is then evaluated at the next listed timestep: a
          :class:`~difflo.samplers.TimeGrid` where the two differ (linspace, and trailing when n does not
          divide T; never leading). The noise-level grids step to their next level under either rule."""
        if step_rule not in schedules.STEP_RULES:
            raise ValueError(f"unknown step rule {step_rule!r}; choose one of {', '.join(schedules.STEP_RULES)}")
        if end not in schedules.GRID_ENDS:
            raise ValueError(f"unknown grid end {end!r}; choose one of {', '.join(schedules.GRID_ENDS)}")
        t_end = self.t_clean if end == "clean" else 0
        if spacing in schedules.SIGMA_SPACINGS:
            return schedules.sigma_timesteps(self.alphas_cumprod, n, spacing) + [t_end]
        times = schedules.timesteps(self.T, n, spacing, offset if spacing == "leading" else 0).tolist()
        if step_rule == "listed":
            return times + [t_end]
        stride = self.T // n
        lands = [t - stride if t - stride >= 0 else t_end for t in times]
        if lands[:-1] == times[1:]:
            return times + [lands[-1]]
        return TimeGrid(times + [lands[-1]], lands)

    def strided_times(self, stride: int) -> list[int]:
        """k * stride for k = (T-1)//stride .. 0, then -1 (stride 30, T 1000: 990, 960, ..., 0, -1)."""
        return list(range((self.T - 1) // stride * stride, -1, -stride)) + [self.t_clean]

    def time_from_cli(self, t: float) -> int:
        """A command-line timestep: an integer 0..T-1."""
        if t != int(t) or not 0 <= t <= self.T - 1:
            raise ValueError(f"timestep {t:g} out of range: this diffusion model has timesteps 0..{self.T - 1}")
        return int(t)

    @property
    def samplers(self) -> tuple[str, ...]:
        return fitting(self)

    def training_loss(self, net, x0, y, d, generator=None, rows: slice = slice(None),
                      offset_noise: float = 0.0) -> torch.Tensor:
        """The denoising loss with ``d``'s prediction and weighting (a DiffusionConfig)."""
        return training_loss(net, x0, y, self, d.prediction, d.loss_weighting, d.min_snr_gamma, generator, rows,
                             offset_noise)


def per_sample(c, x: torch.Tensor):
    """A per-sample coefficient (B,) broadcast to x's shape (B, 1, 1, 1), in x's dtype and device; a Python
    number (one value for the whole batch) as it is."""
    if not isinstance(c, torch.Tensor):
        return c
    return c.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def q_sample(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Forward process q(x_t | x0): x_t = alpha_t x0 + sigma_t eps (Ho et al. 2020, Eq. 4)."""
    return per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * eps


def to_x0(output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
    """The x0 estimate implied by a network output of the given parameterization."""
    a, s = per_sample(alpha, x_t), per_sample(sigma, x_t)
    if prediction == "eps":
        return (x_t - s * output) / a       # x0 = (x_t - sigma eps) / alpha
    if prediction == "x0":
        return output
    if prediction == "v":
        return a * x_t - s * output         # x0 = alpha x_t - sigma v   (alpha^2 + sigma^2 = 1)
    if prediction == "u":
        return x_t - s * output             # x0 = x_t - sigma u         (alpha + sigma = 1)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
    """The eps estimate implied by a network output of the given parameterization."""
    a, s = per_sample(alpha, x_t), per_sample(sigma, x_t)
    if prediction == "eps":
        return output
    if prediction == "x0":
        return (x_t - a * output) / s        # eps = (x_t - alpha x0) / sigma
    if prediction == "v":
        return s * x_t + a * output          # eps = sigma x_t + alpha v
    if prediction == "u":
        return x_t + a * output              # eps = x_t + alpha u        (alpha + sigma = 1)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def target(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
    """What the network is trained to output: eps, x0, or v = alpha eps - sigma x0."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return per_sample(alpha, x0) * eps - per_sample(sigma, x0) * x0
    if prediction == "u":
        return eps - x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def loss_weight(snr: torch.Tensor, prediction: str, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight of the MSE in the prediction's own space.

    ``none``: 1 (the "simple" loss of Ho et al. 2020, Eq. 14, for every parameterization).
    ``min_snr``: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", Eq. 7-8:
    the x0-space weight min(SNR, gamma), expressed in the prediction's space:
    eps: min(SNR, gamma)/SNR, x0: min(SNR, gamma), v: min(SNR, gamma)/(SNR + 1).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if weighting == "none":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if prediction == "u":
        raise ValueError("min_snr weighting is defined for eps, x0 and v predictions (diffusion), not u")
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction]


def training_noise(x0: torch.Tensor, generator: torch.Generator | None, offset_noise: float = 0.0) -> torch.Tensor:
    """Standard normal noise shaped like x0 (B, C, H, W), drawn from ``generator``; with ``offset_noise`` = k
    (Guttenberg 2023, "Diffusion with Offset Noise") k times one standard normal value per image and
    channel is added (drawn after the per-pixel noise), so the model also learns to change an image's mean
    colour."""
    device = generator.device if generator is not None else "cpu"
    eps = torch.randn(x0.shape, generator=generator, device=device)
    if offset_noise:
        eps = eps + offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=generator, device=device)
    return eps.to(x0.device, x0.dtype)


def training_loss(net, x0: torch.Tensor, y: torch.Tensor, schedule: DiscreteSchedule, prediction: str,
                  weighting: str = "none", gamma: float = 5.0, generator: torch.Generator | None = None,
                  rows: slice = slice(None), offset_noise: float = 0.0) -> torch.Tensor:
    """Monte-Carlo estimate of the denoising loss (Ho et al. 2020, Algorithm 1) over a batch:
    t ~ U{0..T-1}, eps ~ N(0, I) (plus per-channel offset noise, :func:`training_noise`),
    loss = w(t) * ||net(x_t, t, y) - target||^2 (mean over pixels).
    ``rows``: the loss over these rows of the batch only (one data-parallel rank's share); t and eps
    are drawn for the whole batch first, so each row gets the draws it gets in the whole batch."""
    B = x0.shape[0]
    t = torch.randint(0, schedule.T, (B,), generator=generator, device=generator.device if generator else "cpu")
    t = t.to(x0.device)
    eps = training_noise(x0, generator, offset_noise)
    x0, y, t, eps = x0[rows], y[rows] if y is not None else None, t[rows], eps[rows]
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = q_sample(x0, eps, alpha, sigma)                                # (B, C, H, W)
    out = net(x_t, schedule.model_time(t), y)                            # (B, C, H, W)
    mse = (out.float() - target(x0, eps, alpha, sigma, prediction).float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    w = loss_weight((alpha**2 / sigma**2).to(x0.device, torch.float32), prediction, weighting, gamma)
    return (w * mse).mean()
