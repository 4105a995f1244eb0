"""Generating images from a model: settings -> denoiser -> sampler, in batches.

:class:`SampleSettings` is the one typed settings object of every front end (``difflo sample``, the
web page, evaluation, experiments, training's sample grids): it *is* the config's ``sample`` section,
so a run's defaults and a command's flags are the same fields. :func:`settings_for` fills in a
model's own defaults, applies overrides and validates them against the model's path once;
:func:`generate` then only runs.

``generate`` draws sample i from its own generator seeded with ``seeds[i]``, so an image depends
on its seed (and label and settings) only, never on the batch size.
"""
from __future__ import annotations

import dataclasses

import torch

from . import memory
from .config import SampleConfig as SampleSettings
from .errors import DiffloError
from .model import Model, make_denoiser
from .precision import PRECISIONS
from .samplers import SAMPLERS, SeededNoise
from .schedules import SPACING_CHOICES

VARIANCES = ("fixed_small", "fixed_large")

__all__ = ["SampleSettings", "VARIANCES", "settings_for", "check_settings", "check_sampler", "check_steps",
           "sampler_options", "describe", "generate"]


def check_sampler(sampler: str, model: Model) -> str:
    """The sampler name, if it fits the model's path; else a one-line DiffloError listing those that do."""
    if sampler not in model.path.samplers:
        raise DiffloError(f"sampler {sampler!r} does not fit this {model.objective} model; choose one of "
                          f"{', '.join(model.path.samplers)}")
    return sampler


def check_steps(steps: int, model: Model) -> int:
    """1 <= steps <= the path's max_steps (a diffusion model's T)."""
    if steps < 1:
        raise DiffloError(f"--steps must be >= 1, got {steps}")
    if model.path.max_steps is not None and steps > model.path.max_steps:
        raise DiffloError(f"--steps {steps} exceeds the model's {model.path.max_steps} training timesteps")
    return steps


def check_settings(s: SampleSettings, model: Model) -> SampleSettings:
    """Raise a one-line DiffloError unless the settings fit the model; return them."""
    path = model.path
    check_sampler(s.sampler, model)
    check_steps(s.steps, model)
    if s.spacing not in SPACING_CHOICES:
        raise DiffloError(f"unknown spacing {s.spacing!r}; choose one of {', '.join(SPACING_CHOICES)}")
    try:
        path.sampling_times(1, s.spacing)             # the path says why a spacing does not fit it
    except ValueError as e:
        raise DiffloError(str(e)) from None
    if s.s_churn < 0 or s.s_noise <= 0 or s.s_tmin > s.s_tmax:
        raise DiffloError(f"churn needs s_churn >= 0, s_noise > 0 and s_tmin <= s_tmax; got s_churn={s.s_churn}, "
                          f"s_noise={s.s_noise}, s_tmin={s.s_tmin}, s_tmax={s.s_tmax}")
    if s.s_churn > 0 and "s_churn" not in SAMPLERS[s.sampler].options:
        takes = [n for n in path.samplers if "s_churn" in SAMPLERS[n].options]
        raise DiffloError(f"sampler {s.sampler} has no churn (s_churn={s.s_churn}); churn applies to "
                          f"{', '.join(takes) or 'no sampler of this model'}, or set s_churn to 0")
    if s.variance not in VARIANCES:
        raise DiffloError(f"unknown DDPM variance {s.variance!r}; choose one of {', '.join(VARIANCES)}")
    if s.precision not in PRECISIONS:
        raise DiffloError(f"unknown precision {s.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not (s.w >= 0 and s.eta >= 0):
        raise DiffloError(f"guidance w and eta must be >= 0, got w={s.w}, eta={s.eta}")
    return s


def settings_for(model: Model, **overrides) -> SampleSettings:
    """The model's own sample settings (its config's ``sample`` section) with ``overrides`` applied
    (a None value keeps the model's), checked against the model."""
    return check_settings(dataclasses.replace(model.cfg.sample, **{k: v for k, v in overrides.items()
                                                                   if v is not None}), model)


def sampler_options(s: SampleSettings) -> dict:
    """The keyword options of the chosen sampler, taken from the settings (``eta`` for DDIM,
    ``variance`` for DDPM, the churn ``s_*`` for Euler and Heun; nothing for the others)."""
    return {name: getattr(s, name) for name in SAMPLERS[s.sampler].options}


def describe(s: SampleSettings) -> str:
    return ", ".join(f"{f.name}={getattr(s, f.name)}" for f in dataclasses.fields(s))


def generate(model: Model, labels: torch.Tensor, seeds, settings: SampleSettings | None = None,
             batch_size: int = 250, callback=None, progress=None) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] for the given labels and per-image seeds.

    ``settings``: checked :class:`SampleSettings` (default: the model's own, ``settings_for(model)``).
    ``callback`` receives the sampler's per-step dict plus ``"batch"`` (the batch index)."""
    s = settings_for(model) if settings is None else check_settings(settings, model)
    memory.tune_malloc()
    n_cls = model.num_classes
    if n_cls and len(labels) and (labels.min() < 0 or labels.max() >= n_cls):
        raise DiffloError(f"class index out of range: this model has classes 0..{n_cls - 1}")
    device = model.device
    c, size = model.cfg.model.in_channels, model.cfg.model.image_size
    den = make_denoiser(model, s.w, s.clip_x0, model.precision(s.precision).dtype)
    ts = model.path.sampling_times(s.steps, s.spacing)
    sampler, options = SAMPLERS[s.sampler], sampler_options(s)
    seeds = [int(x) for x in seeds]
    out = []
    for b, start in enumerate(range(0, len(seeds), batch_size)):
        noise = SeededNoise(seeds[start:start + batch_size], (c, size, size), device)
        x = noise()                                   # (B, C, H, W): x_T ~ N(0, I)
        y = labels[start:start + batch_size].to(device)
        cb = None if callback is None else (lambda d, b=b: callback({**d, "batch": b}))
        out.append(sampler(den, x, ts, extra_args={"y": y}, callback=cb, noise=noise, **options).cpu())
        if progress is not None:
            progress.update(len(y))
    return torch.cat(out)
