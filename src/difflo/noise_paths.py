"""The one protocol every noising path implements, and the factory from a config.

A *path* is a family ``x_t = alpha_t x0 + sigma_t eps`` with its own time axis. Everything that
differs between training objectives is carried by the path object, never by a string checked at
the call site:

==================  =============================================  ==============================  ==========================
                    :class:`~difflo.diffusion.DiscreteSchedule`    :class:`~difflo.flow.FlowPath`  :class:`~.edm.EDMPath`
==================  =============================================  ==============================  ==========================
time                integer timesteps 0..T-1, clean end -1         t in [0, 1], clean end 0        t = sigma, clean end 0
``sampling_times``  ``schedules.timesteps(T, n, spacing)`` + [-1]  n + 1 uniform times 1 .. 0      Eq. 5's 80 .. 0.002, 0
``max_steps``       T                                              None (any)                      None (any)
``cli_scale``       T (``--t 500`` is timestep 500)                1000 (``--t 500`` is t = 0.5)   1000 (the rho-ramp)
``samplers``        ddpm, ddim, dpmpp                              euler, heun, ddim, dpmpp        the same as flow's
``training_loss``   DDPM denoising loss (eps / x0 / v)             flow matching (u)               EDM's (Table 1)
``beta_schedule``   True (zero_terminal_snr, ``difflo export``)    False                           False
``timestep_grids``  True (steps_offset, step_rule, grid_end)       False                           False
``prior_std``       1                                              1                               sigma_max
``network_input``   x                                              x                               c_in x
``x0_hat``          ``to_x0`` (eps / x0 / v)                       ``to_x0`` (u)                   c_skip x + c_out F
``describe(d)``     "diffusion, cosine, v-prediction"              "flow, u-prediction"            "edm, sigma_data 0.5, ..."
==================  =============================================  ==============================  ==========================

**Time grids contain their clean end** (k-diffusion's ``append_zero``): a sampler walks
``zip(ts[:-1], ts[1:])``, so a part of a trajectory (SDEdit from level k, RePaint's chunks) is a
slice ``ts[i:j + 1]`` (diffusion's ``grid_end: t0`` ends at timestep 0 instead, and its ``step_rule: stride``
grid, a :class:`~difflo.samplers.TimeGrid`, lands its steps between the listed times). Which samplers
fit is decided by the sampler's needs (``Sampler.needs`` in :mod:`difflo.samplers`) against the path's
``variance_preserving`` and ``continuous`` flags.
"""
from __future__ import annotations

from typing import ClassVar, Protocol, Sequence

import torch

from .diffusion import DiscreteSchedule
from .edm import EDMPath
from .flow import FlowPath
from .samplers import fitting


class NoisePath(Protocol):
    """Every member any difflo code reads from a path (``tests/unit/test_path_protocol.py`` parses the sources
    and fails on a ``path.X`` not declared here; :func:`make_path` checks a built path has them all).
    ``ClassVar`` members are answered by the class itself, before any path is built (config validation,
    :func:`samplers_for`, ``difflo export``)."""

    t_clean: ClassVar[int | float]
    """The time of the clean data (alpha = 1, sigma = 0), where every sampler ends."""
    variance_preserving: ClassVar[bool]
    """alpha^2 + sigma^2 = 1: DDPM's posterior applies (the ddpm sampler, the variational bound)."""
    continuous: ClassVar[bool]
    """A continuous time axis with d_alpha_sigma(t) (Euler/Heun, the flow ODE's data end at sigma > 0)."""
    beta_schedule: ClassVar[bool]
    """Built from a DDPM beta schedule: zero_terminal_snr rescales it, diffusers' DDPMScheduler expresses it."""
    timestep_grids: ClassVar[bool]
    """Samples on diffusion timestep grids: sample.steps_offset, step_rule and grid_end apply."""
    predictions: ClassVar[tuple[str, ...]]
    """The diffusion.prediction choices (what the network may be trained to predict)."""
    loss_weightings: ClassVar[tuple[str, ...]]
    """The diffusion.loss_weighting choices."""
    t_samplings: ClassVar[tuple[str, ...]]
    """The diffusion.t_sampling choices (how training draws its times)."""

    @property
    def prior_std(self) -> float:
        """The standard deviation of the noise x that sampling from the grid's noise end starts from
        (x = prior_std z: 1 on DDPM's and the flow path, sigma_max on EDM's variance-exploding path)."""

    def network_input(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """What the network sees for the state x at (alpha, sigma): x itself, or EDM's c_in x."""

    def x0_hat(self, output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
        """The x0 estimate from the network's output for x (:func:`difflo.diffusion.to_x0`, or EDM's D)."""

    @property
    def max_steps(self) -> int | None:
        """The most sampling steps (None: unbounded)."""

    @property
    def cli_scale(self) -> int:
        """Command-line times run over (0, cli_scale] (``--t``, the web page's time)."""

    @property
    def spacings(self) -> tuple[str, ...]:
        """The time-grid spacings :meth:`sampling_times` takes (of ``schedules.SPACING_CHOICES``)."""

    @property
    def samplers(self) -> Sequence[str]:
        """The names of the samplers that fit this path, in registry order."""

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t): Python floats for a Python number t, float64 tensors for a tensor t."""

    def d_alpha_sigma(self, t):
        """(d alpha/dt, d sigma/dt) at t; only where ``continuous`` (a discrete path raises ValueError)."""

    def time_at_nsr(self, nsr: float) -> float:
        """The (fractional) time where sigma_t / alpha_t = nsr."""

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value the network is conditioned on, float32, for path times t (B,)."""

    def sampling_times(self, n: int, spacing: str = "trailing", offset: int = 0, step_rule: str = "listed",
                       end: str = "clean") -> list:
        """n steps of ``spacing`` from the noise end: n + 1 times ending at the clean end."""

    def strided_times(self, stride: int) -> list:
        """Every ``stride``-th time from the noise end, then the clean end (the editing grids)."""

    def time_from_cli(self, t: float) -> int | float:
        """A command-line time on the ``cli_scale`` as a path time (ValueError out of range)."""

    def training_loss(self, net, x0, y, d, generator=None, rows: slice = slice(None),
                      offset_noise: float = 0.0) -> torch.Tensor:
        """The training loss of ``d`` (a DiffusionConfig) on a batch x0 (B, C, H, W) with labels y."""

    @classmethod
    def from_config(cls, d) -> "NoisePath":
        """The path of a DiffusionConfig."""

    @staticmethod
    def max_steps_for(d) -> int | None:
        """``max_steps`` of the path a DiffusionConfig would build, without building it."""

    @classmethod
    def describe(cls, d) -> str:
        """The objective of a DiffusionConfig in words for a report, e.g. ``diffusion, cosine, v-prediction``."""


# The declared members, read from the protocol itself (its annotations and its methods and properties).
MEMBERS: tuple[str, ...] = tuple(n for n in {**NoisePath.__annotations__, **vars(NoisePath)} if not n.startswith("_"))

PATHS = {"diffusion": DiscreteSchedule, "flow": FlowPath, "edm": EDMPath}      # diffusion.objective -> its path class
OBJECTIVES = tuple(PATHS)


def missing_members(path) -> list[str]:
    """The members of :class:`NoisePath` that ``path`` (a path or a path class) lacks."""
    return [m for m in MEMBERS if not hasattr(path, m)]


def make_path(d) -> NoisePath:
    """The path of a DiffusionConfig: DDPM's discrete schedule, the straight flow path or EDM's (checked to have
    every member of :class:`NoisePath`)."""
    path = PATHS[d.objective].from_config(d)
    missing = missing_members(path)
    if missing:
        raise TypeError(f"{type(path).__name__} does not implement NoisePath: it lacks {', '.join(missing)}")
    return path


def samplers_for(objective: str) -> tuple[str, ...]:
    """The samplers that fit an objective's path (the flags are class attributes: no path is built)."""
    return fitting(PATHS[objective])
