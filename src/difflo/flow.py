"""Flow matching with the straight-line path (rectified flow).

Liu, Gong & Liu 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow", Eq. 1; Lipman et al. 2023, "Flow Matching for Generative Modeling", Sec. 4.1
(the conditional OT path with sigma_min = 0).

Conventions (the same time direction as difflo's diffusion; pinned by ``tests/unit/test_flow.py``):

* Continuous time ``t`` in [0, 1]; **t = 0 is data, t = 1 is noise**:
  ``x_t = (1 - t) x0 + t x1`` with ``x1 ~ N(0, I)``. In the Gaussian-path notation of
  :mod:`difflo.diffusion` this is ``alpha_t = 1 - t``, ``sigma_t = t`` (``x1`` is ``eps``).
* The network predicts the **velocity** ``u = dx_t/dt = x1 - x0`` (prediction ``"u"``): it points
  from data to noise, so sampling integrates dx/dt = u from t = 1 down to t = 0.
* Training times: ``uniform`` t ~ U(0, 1), or ``logit_normal`` t = sigmoid(n), n ~ N(m, s^2)
  (Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 3.1), which spends more of the
  training on the middle of the path.
"""
from __future__ import annotations

import torch

import math

from .diffusion import UnscaledNetwork, q_sample, target, training_noise
from .samplers import fitting

T_SAMPLINGS = ("uniform", "logit_normal")


class FlowPath(UnscaledNetwork):
    """alpha_t = 1 - t, sigma_t = t for t in [0, 1]; ``t_clean = 0`` is the data end.
    Implements :class:`difflo.noise_paths.NoisePath`."""

    t_clean = 0.0
    time_scale = 1000.0          # the network sees 1000 t, the range of diffusion timesteps
    variance_preserving = False  # alpha + sigma = 1, not alpha^2 + sigma^2: no DDPM posterior
    continuous = True            # d alpha/dt, d sigma/dt exist: Euler and Heun apply
    beta_schedule = False        # no betas: zero_terminal_snr and diffusers' DDPM schedulers do not apply
    timestep_grids = False       # a uniform grid in t: steps_offset, step_rule and grid_end stay 0, listed, clean
    max_steps = None             # any number of steps
    cli_scale = 1000             # command-line times are per mille: --t 500 is t = 0.5
    spacings = ("trailing", "linspace")   # the grid is uniform in t from the noise end (see sampling_times)
    predictions = ("u",)         # the velocity
    loss_weightings = ("none",)
    t_samplings = T_SAMPLINGS

    @classmethod
    def from_config(cls, d) -> "FlowPath":
        return cls()

    @staticmethod
    def max_steps_for(d) -> None:
        return None

    @classmethod
    def describe(cls, d) -> str:
        """The objective in words: ``flow, u-prediction``."""
        return f"{d.objective}, {d.prediction}-prediction"

    def alpha_sigma(self, t):
        if isinstance(t, (int, float)):
            t = float(t)
            return 1.0 - t, t
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1.0 - t, t

    def d_alpha_sigma(self, t):
        """(d alpha/dt, d sigma/dt) = (-1, 1): the velocity is u = -x0 + eps."""
        return -1.0, 1.0

    def time_at_nsr(self, nsr: float) -> float:
        """The time where sigma_t / alpha_t = t / (1 - t) equals nsr: t = nsr / (1 + nsr)."""
        return 1.0 if math.isinf(nsr) else nsr / (1.0 + nsr)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32) * self.time_scale

    def sampling_times(self, n: int, spacing: str = "trailing", offset: int = 0, step_rule: str = "listed",
                       end: str = "clean") -> list[float]:
        """n uniform steps from t = 1 (noise) to t = 0 (the clean end): n + 1 times. The grid starts
        at the noise end, as ``trailing`` and ``linspace`` do for diffusion; ``leading`` (which never
        visits pure noise) is refused, and so are the diffusion timestep grids' ``offset``, ``step_rule``
        and ``end`` other than their defaults (0, listed, clean)."""
        if n < 1:
            raise ValueError(f"number of sampling steps must be >= 1, got {n}")
        if (offset, step_rule, end) != (0, "listed", "clean"):
            raise ValueError(f"steps_offset={offset}, step_rule={step_rule} and grid_end={end} are settings of "
                             f"diffusion timestep grids; a flow model's grid takes 0, listed and clean")
        if spacing not in ("trailing", "linspace"):
            raise ValueError(f"spacing {spacing!r} does not apply to flow models: their grid is uniform from "
                             f"t = 1; use trailing or linspace")
        return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).tolist()

    def strided_times(self, stride: int) -> list[float]:
        """The per-mille times k * stride / 1000 from the noise end (stride 30: 0.99, 0.96, ..., 0.03), then 0."""
        return [k * stride / 1000.0 for k in range(1000 // stride, 0, -1)] + [self.t_clean]

    def time_from_cli(self, t: float) -> float:
        """A command-line time on the per-mille scale: t/1000 in (0, 1] (``--t 500`` is t = 0.5)."""
        if not 0 < t <= 1000:
            raise ValueError(f"timestep {t:g} out of range: for flow models give t in (0, 1000] (per mille)")
        return t / 1000.0

    @property
    def samplers(self) -> tuple[str, ...]:
        return fitting(self)

    def training_loss(self, net, x0, y, d, generator=None, rows: slice = slice(None),
                      offset_noise: float = 0.0) -> torch.Tensor:
        """The flow-matching loss with ``d``'s time sampling (a DiffusionConfig)."""
        return training_loss(net, x0, y, self, d.t_sampling, d.logit_mean, d.logit_std, generator, rows,
                             offset_noise)


def sample_t(B: int, how: str, generator: torch.Generator | None, mean: float = 0.0, std: float = 1.0
             ) -> torch.Tensor:
    """(B,) training times in (0, 1), float64."""
    device = generator.device if generator is not None else "cpu"
    if how == "uniform":
        return torch.rand(B, generator=generator, device=device, dtype=torch.float64)
    if how == "logit_normal":
        n = torch.randn(B, generator=generator, device=device, dtype=torch.float64)
        return torch.sigmoid(mean + std * n)
    raise ValueError(f"unknown t sampling {how!r}; choose one of {', '.join(T_SAMPLINGS)}")


def training_loss(net, x0: torch.Tensor, y: torch.Tensor, path: FlowPath, t_sampling: str = "logit_normal",
                  logit_mean: float = 0.0, logit_std: float = 1.0, generator: torch.Generator | None = None,
                  rows: slice = slice(None), offset_noise: float = 0.0) -> torch.Tensor:
    """Conditional flow-matching loss (Lipman et al. 2023, Eq. 9 with the OT path):
    t ~ p(t), x1 ~ N(0, I) (plus offset noise, :func:`difflo.diffusion.training_noise`),
    x_t = (1 - t) x0 + t x1, loss = ||net(x_t, t, y) - (x1 - x0)||^2.
    ``rows``: as for :func:`difflo.diffusion.training_loss` (draws for the whole batch, loss over rows)."""
    B = x0.shape[0]
    t = sample_t(B, t_sampling, generator, logit_mean, logit_std).to(x0.device)
    x1 = training_noise(x0, generator, offset_noise)
    x0, y, t, x1 = x0[rows], y[rows] if y is not None else None, t[rows], x1[rows]
    alpha, sigma = path.alpha_sigma(t)
    x_t = q_sample(x0, x1, alpha, sigma)                                  # (B, C, H, W)
    out = net(x_t, path.model_time(t), y)
    return (out.float() - target(x0, x1, alpha, sigma, "u").float()).pow(2).mean()
