"""The one protocol every noising path implements, and the factory from a config.

A *path* is a family ``x_t = alpha_t x0 + sigma_t eps`` with its own time axis. Everything that
differs between training objectives is carried by the path object, never by a string checked at
the call site:

==================  =============================================  ===================================
                    :class:`~difflo.diffusion.DiscreteSchedule`    :class:`~difflo.flow.FlowPath`
==================  =============================================  ===================================
time                integer timesteps 0..T-1, clean end -1         t in [0, 1], clean end 0
``sampling_times``  ``schedules.timesteps(T, n, spacing)`` + [-1]  n + 1 uniform times 1 .. 0
``max_steps``       T                                              None (any)
``cli_scale``       T (``--t 500`` is timestep 500)                1000 (``--t 500`` is t = 0.5)
``samplers``        ddpm, ddim, dpmpp                              euler, heun, ddim, dpmpp
``training_loss``   DDPM denoising loss (eps / x0 / v)             flow matching (u)
==================  =============================================  ===================================

**Time grids contain their clean end** (k-diffusion's ``append_zero``): a sampler walks
``zip(ts[:-1], ts[1:])``, so a part of a trajectory (SDEdit from level k, RePaint's chunks) is a
slice ``ts[i:j + 1]`` (diffusion's ``grid_end: t0`` ends at timestep 0 instead, and its ``step_rule: stride``
grid, a :class:`~difflo.samplers.TimeGrid`, lands its steps between the listed times). Which samplers
fit is decided by the sampler's needs (``Sampler.needs`` in :mod:`difflo.samplers`) against the path's
``variance_preserving`` and ``continuous`` flags.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .diffusion import DiscreteSchedule
from .flow import FlowPath
from .samplers import fitting


class NoisePath(Protocol):
    t_clean: int | float              # the time of the clean data (alpha = 1, sigma = 0)
    variance_preserving: bool         # alpha^2 + sigma^2 = 1
    continuous: bool                  # has d_alpha_sigma(t)
    max_steps: int | None             # the most sampling steps (None: unbounded)
    cli_scale: int                    # command-line times run over (0, cli_scale]

    def alpha_sigma(self, t): ...
    def model_time(self, t: torch.Tensor) -> torch.Tensor: ...
    def sampling_times(self, n: int, spacing: str = "trailing", offset: int = 0, step_rule: str = "listed",
                       end: str = "clean") -> list: ...
    def strided_times(self, stride: int) -> list: ...
    def time_from_cli(self, t: float): ...
    @property
    def samplers(self) -> Sequence[str]: ...
    def training_loss(self, net, x0, y, d, generator=None, rows: slice = slice(None)) -> torch.Tensor: ...
    # Class level, for validating a config without building the path:
    predictions: tuple[str, ...]      # diffusion.prediction choices
    loss_weightings: tuple[str, ...]  # diffusion.loss_weighting choices
    t_samplings: tuple[str, ...]      # diffusion.t_sampling choices
    @classmethod
    def from_config(cls, d) -> "NoisePath": ...
    @staticmethod
    def max_steps_for(d) -> int | None: ...


PATHS = {"diffusion": DiscreteSchedule, "flow": FlowPath}      # diffusion.objective -> its path class
OBJECTIVES = tuple(PATHS)


def make_path(d) -> NoisePath:
    """The path of a DiffusionConfig: DDPM's discrete schedule, or the straight flow path."""
    return PATHS[d.objective].from_config(d)


def samplers_for(objective: str) -> tuple[str, ...]:
    """The samplers that fit an objective's path (the flags are class attributes: no path is built)."""
    return fitting(PATHS[objective])
