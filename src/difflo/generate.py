"""Generating images from a model: settings -> denoiser -> sampler, in batches.

:class:`SampleSettings` is the one typed settings object of every front end (``difflo sample``, the
web page, evaluation, experiments, training's sample grids): it *is* the config's ``sample`` section,
so a run's defaults and a command's flags are the same fields. :func:`settings_for` fills in a
model's own defaults, applies overrides and validates them against the model's path once;
:func:`generate` then only runs.

``generate`` draws sample i from its own generator seeded with ``seeds[i]``, so an image depends
on its seed (and label and settings) only, never on the batch size.

Sampler options (``eta``, ``variance``, the churn ``s_*``; :data:`difflo.samplers.OPTIONS`) are read only
by the samplers whose registry entry lists them. One the caller sets (an override of
:func:`settings_for`: a command-line flag) that the chosen sampler does not read is a one-line error; one
the run's config carries is a default for whichever sampler reads it, silent, except that a non-default
value the config's own sampler does not read gets a one-line note (once) when that sampler runs.
:func:`describe` lists only the options the sampler reads.
"""
from __future__ import annotations

import dataclasses

import torch

from . import allocator
from .config import SampleConfig as SampleSettings, guidance_problems
from .errors import DiffloError
from .model import Model, make_denoiser, note_once
from .precision import PRECISIONS
from .samplers import NEEDS_ON, OPTIONS, SAMPLERS, VARIANCES, SeededNoise, as_flag, check_options, unused_option
from .schedules import SPACING_CHOICES

GUIDANCE_FLAGS = ("--guidance-interval", "--guidance-rescale")   # the guidance options as flags, for errors

__all__ = ["SampleSettings", "VARIANCES", "settings_for", "check_settings", "check_guidance", "check_sampler",
           "check_steps", "sampler_options", "unused_options", "record", "time_grid", "describe", "generate"]


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


def check_guidance(interval: tuple[float, ...], rescale: float) -> None:
    """A one-line DiffloError, naming the flags, unless the guidance interval and rescale are valid."""
    problems = guidance_problems(interval, rescale, GUIDANCE_FLAGS)
    if problems:
        raise DiffloError("; ".join(problems))


def check_settings(s: SampleSettings, model: Model) -> SampleSettings:
    """Raise a one-line DiffloError unless the settings fit the model; return them."""
    path = model.path
    check_sampler(s.sampler, model)
    check_steps(s.steps, model)
    if s.spacing not in SPACING_CHOICES:
        raise DiffloError(f"unknown spacing {s.spacing!r}; choose one of {', '.join(SPACING_CHOICES)}")
    try:
        time_grid(path, s)                             # the path says why a spacing (offset, rule, end) does not fit it
    except ValueError as e:
        raise DiffloError(str(e)) from None
    if s.s_churn < 0 or s.s_noise <= 0 or s.s_tmin > s.s_tmax:
        raise DiffloError(f"churn needs s_churn >= 0, s_noise > 0 and s_tmin <= s_tmax; got s_churn={s.s_churn}, "
                          f"s_noise={s.s_noise}, s_tmin={s.s_tmin}, s_tmax={s.s_tmax}")
    if s.variance not in VARIANCES:
        raise DiffloError(f"unknown DDPM variance {s.variance!r}; choose one of {', '.join(VARIANCES)}")
    if s.precision not in PRECISIONS:
        raise DiffloError(f"unknown precision {s.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not (s.w >= 0 and s.eta >= 0):
        raise DiffloError(f"guidance w and eta must be >= 0, got w={s.w}, eta={s.eta}")
    check_guidance(s.guidance_interval, s.guidance_rescale)   # not sampler options: every sampler reads them
    for option in unused_options(s):
        value = getattr(s, option)
        if value != getattr(model.cfg.sample, option):     # set by the caller, not carried from the run's config
            raise DiffloError(unused_option(s.sampler, option, lambda o: f"{o}={value}", path.samplers))
        if s.sampler == model.cfg.sample.sampler:         # the config's own sampler ignores its own value
            note_once("note: the run's " + unused_option(s.sampler, option, lambda o: f"sample.{o}={value}",
                                                          path.samplers))
    return s


def settings_for(model: Model, **overrides) -> SampleSettings:
    """The model's own sample settings (its config's ``sample`` section) with ``overrides`` applied
    (a None value keeps the model's), checked against the model. An override of a sampler option that
    the sampler does not read is a one-line DiffloError naming it as its flag (``--eta``)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    s = dataclasses.replace(model.cfg.sample, **given)
    check_sampler(s.sampler, model)
    check_options(s.sampler, [k for k in given if k in OPTIONS], fits=model.path.samplers,
                  which="" if "sampler" in given else "the run's sample.sampler; choose one with --sampler")
    s = check_settings(s, model)
    for option, switch in NEEDS_ON.items():         # a warning, not an error: churn 0 vs 3 with the same flags
        if option in given and not getattr(s, switch):
            note_once(f"warning: {as_flag(option)} has no effect while {as_flag(switch)} is 0 (no churn); "
                       f"give {as_flag(switch)} > 0 to use it")
    return s


def unused_options(s: SampleSettings) -> list[str]:
    """The sampler options that hold a value other than their default and that ``s.sampler`` does not read."""
    default = SampleSettings()
    return [o for o in OPTIONS if o not in SAMPLERS[s.sampler].options and getattr(s, o) != getattr(default, o)]


def sampler_options(s: SampleSettings) -> dict:
    """The keyword options of the chosen sampler, taken from the settings (``eta`` for DDIM,
    ``variance`` for DDPM, the churn ``s_*`` for Euler and Heun; nothing for the others)."""
    return {name: getattr(s, name) for name in SAMPLERS[s.sampler].options}


def record(s: SampleSettings) -> dict:
    """The settings as they act: every field but the sampler options that ``s.sampler`` does not read."""
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
            if f.name not in OPTIONS or f.name in SAMPLERS[s.sampler].options}


def time_grid(path, s: SampleSettings) -> list:
    """The sampler's time grid of the settings: ``s.steps`` times of ``s.spacing`` (leading with
    ``s.steps_offset``), stepped by ``s.step_rule``, ending at ``s.grid_end`` (the path's ``sampling_times``)."""
    return path.sampling_times(s.steps, s.spacing, s.steps_offset, s.step_rule, s.grid_end)


def describe(s: SampleSettings) -> str:
    return ", ".join(f"{k}={v}" for k, v in record(s).items())


@torch.no_grad()
def generate(model: Model, labels: torch.Tensor, seeds, settings: SampleSettings | None = None,
             batch_size: int = 250, callback=None, progress=None, guide: Model | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] for the given labels and per-image seeds.

    ``settings``: checked :class:`SampleSettings` (default: the model's own, ``settings_for(model)``).
    ``callback`` receives the sampler's per-step dict plus ``"batch"`` (the batch index); ``guide``: the
    autoguidance guide (``--guide``; :func:`difflo.model.make_denoiser`)."""
    s = settings_for(model) if settings is None else check_settings(settings, model)
    allocator.tune_malloc()
    n_cls = model.num_classes
    if n_cls and len(labels) and (labels.min() < 0 or labels.max() >= n_cls):
        raise DiffloError(f"class index out of range: this model has classes 0..{n_cls - 1}")
    device = model.device
    c, size = model.cfg.model.in_channels, model.cfg.model.image_size
    den = make_denoiser(model, s.w, s.clip_x0, model.precision(s.precision).dtype, interval=s.guidance_interval,
                        rescale=s.guidance_rescale, guide=guide)
    ts = time_grid(model.path, s)
    sampler, options = SAMPLERS[s.sampler], sampler_options(s)
    seeds = [int(x) for x in seeds]
    out = []
    for b, start in enumerate(range(0, len(seeds), batch_size)):
        noise = SeededNoise(seeds[start:start + batch_size], (c, size, size), device)
        x = noise() * model.path.prior_std            # (B, C, H, W): x_T ~ N(0, I) (EDM: N(0, sigma_max^2 I))
        y = labels[start:start + batch_size].to(device)
        cb = None if callback is None else (lambda d, b=b: callback({**d, "batch": b}))
        out.append(sampler(den, x, ts, extra_args={"y": y}, callback=cb, noise=noise, **options).cpu())
        if progress is not None:
            progress.update(len(y))
    return torch.cat(out)
