"""Typed configuration: dataclasses with the defaults, loaded from YAML with dotted overrides.

A run's *resolved* config (every field, after data-dependent values such as the number of classes
are filled in) is written to ``RUN/config.yaml`` and into the metadata of every weights file, so a
checkpoint alone rebuilds its model (nanoGPT's ``model_args``, without pickled code).

The defaults are the ``mnist10k`` demo's: chosen by measuring on 2 CPU cores (docs/decisions.md).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError, DiffloError
from .eval import FEATURES
from . import posthoc_ema, precision, samplers, schedules
from .images import parse_colour
from .nn.unet import UNetConfig
from .edm import DEFAULTS as EDM_DEFAULTS, EDMPath
from .noise_paths import OBJECTIVES, PATHS, samplers_for


@dataclass
class DataConfig:
    name: str = "mnist10k"             # a data set name (see `difflo.data.DATASETS`)
    root: str | None = None            # where its files are (not needed for mnist10k)
    split: str = "train"
    image_size: int | None = None      # resize + center-crop to this size (None: the data set's own)
    flip: bool = False                 # random horizontal flips (not for digits)
    attribute: str | None = None       # CelebA: condition on this attribute (None: unconditional)
    background: str = "white"          # images with transparency are composited over this colour (name, #rrggbb, r,g,b)
    label: str | None = None           # emoji: subcategory (default) | category
    styles: tuple[str, ...] | None = None   # emoji: image sets to use (default: google and twitter)
    classes: tuple[str, ...] = ()      # class names, filled in from the data by training (stored with the model)
    cache_dir: str | None = None       # where decoded, resized images are cached as .npy, read memory-mapped; needs room
                                       # for the whole decoded set (None: $XDG_CACHE_HOME/difflo, else ~/.cache/difflo)
    per_class: int | None = None       # keep only the first k images of each class (tiny-data studies)


@dataclass
class DiffusionConfig:
    objective: str = "diffusion"       # diffusion (DDPM, discrete t) | flow (rectified flow, t in [0, 1]) | edm
    schedule: str = "cosine"           # diffusion: linear | cosine | sigmoid | scaled_linear | explicit
    timesteps: int = 1000              # diffusion: T
    beta_start: float = 1e-4           # diffusion, linear / scaled_linear: the first beta
    beta_end: float = 0.02             # diffusion, linear / scaled_linear: the last beta
    betas: tuple[float, ...] = ()      # diffusion, explicit: the T betas themselves (diffusers' trained_betas)
    clip_range: float = 1.0            # sample.clip_x0 clamps x0 to [-clip_range, clip_range] (clip_sample_range)
    prediction: str = "v"              # diffusion: eps | x0 | v;  flow: u (the velocity);  edm: edm (F in EDM's D)
    zero_terminal_snr: bool = False    # diffusion: rescale the schedule so alpha_bar_{T-1} = 0 (Lin et al. 2024; v or x0)
    loss_weighting: str = "none"       # diffusion: none | min_snr
    min_snr_gamma: float = 5.0
    t_sampling: str = "uniform"        # flow: uniform | logit_normal (diffusion: uniform; edm: log_normal)
    logit_mean: float = 0.0            # flow, logit_normal: t = sigmoid(mean + std * n)
    logit_std: float = 1.0
    # edm (Karras et al. 2022, Table 1 and Eq. 5; difflo.edm): the data's std, ln sigma ~ N(p_mean, p_std^2)
    # in training, and the sampling grid's sigma_max .. sigma_min with Eq. 5's rho. Read only by objective edm.
    sigma_data: float = EDM_DEFAULTS["sigma_data"]
    p_mean: float = EDM_DEFAULTS["p_mean"]
    p_std: float = EDM_DEFAULTS["p_std"]
    sigma_min: float = EDM_DEFAULTS["sigma_min"]
    sigma_max: float = EDM_DEFAULTS["sigma_max"]
    rho: float = EDM_DEFAULTS["rho"]


LR_SCHEDULES = ("constant", "cosine", "exponential")   # after warmup; difflo.train.lr_at follows them


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    lr_schedule: str = "constant"      # constant | cosine | exponential (after warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1          # cosine/exponential decay to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    grad_clip: float = 1.0             # max global grad norm; 0 disables
    label_dropout: float = 0.1         # p of replacing the label by the null class (for CFG)
    ema_decay: float = 0.999
    ema_warmup: bool = True            # decay_k = min(ema_decay, (1 + k) / (10 + k))
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10      # stop after this many steps in a row with a NaN/inf loss or gradient
    sample_every: int = 1000           # 0 disables the sample grids during training
    max_minutes: float | None = None   # stop (with a checkpoint) after this much wall time
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    compile: bool = False              # torch.compile the network (first steps are slow: compilation)
    precision: str = "auto"            # auto | fp32 | bf16 | fp16 (autocast; see difflo.precision): auto = bf16
                                       # where the hardware has bf16 units (CUDA, AVX512-BF16/AMX CPUs), else fp32
    offset_noise: float = 0.0          # add k * N(0, 1) per image and channel to the training noise (offset noise)
    grad_accum: int = 1                # split each step's batch into K micro-batches: the same update, less memory
    log: tuple[str, ...] = ("csv",)    # [csv] (RUN/metrics.csv, always) or [csv, tensorboard] (+ RUN/tensorboard/;
                                       # pip install "difflo[tensorboard]")
    posthoc_ema: tuple[float, ...] = ()   # post-hoc EMA (EDM2): the sigma_rels of the power-function averages tracked,
                                       # e.g. [0.05, 0.10]; [] off. `difflo ema RUN --sigma-rel S` rebuilds any other
    posthoc_every: int | None = None   # their snapshots to RUN/posthoc/ every N steps (None: train.ckpt_every)


@dataclass
class SampleConfig:
    """Defaults for `difflo sample` (each is also a flag). DDPM 50, w = 2: the demo model's best
    Inception FID among the measured defaults (docs/decisions.md "Demo defaults", 2026-11-30)."""
    sampler: str = "ddpm"
    steps: int = 50
    eta: float = 0.0
    w: float = 2.0
    spacing: str = "trailing"          # leading | trailing | linspace | karras | exponential (noise-level grids)
    steps_offset: int = 0              # diffusion, leading spacing: added to every timestep (diffusers' steps_offset)
    step_rule: str = "listed"          # diffusion: listed (each step goes to the grid's next timestep) | stride (from t
                                       # to t - T // n, then on from the next listed one: diffusers' DDIMScheduler)
    grid_end: str = "clean"            # diffusion: clean (the last step reaches the data, alpha_bar = 1) | t0 (timestep
                                       # 0, alpha_bar_0: diffusers' DDIM set_alpha_to_one: false)
    clip_x0: bool = True
    variance: str = "fixed_small"      # DDPM only: fixed_small | fixed_large
    s_churn: float = 0.0               # euler/heun (flow): EDM's churn (Karras et al. 2022, Alg. 2); 0: deterministic
    s_tmin: float = 0.0                # ... only at times s_tmin <= t <= s_tmax (the path's time: flow t in [0, 1])
    s_tmax: float = 1.0
    s_noise: float = 1.0               # ... the std of the added noise, relative
    precision: str = "auto"            # auto | fp32 | bf16 | fp16: the network's autocast (difflo.precision)
    guidance_interval: tuple[float, ...] = ()  # [lo, hi]: guide only where sigma/alpha lies in [lo, hi] (Kynkaanniemi
                                       # et al. 2024), w = 1 elsewhere; []: everywhere
    guidance_rescale: float = 0.0      # phi in [0, 1]: rescaled guidance (Lin et al. 2024, Eq. 15-16); 0: off


@dataclass
class EvalConfig:
    """Periodic evaluation during training (off unless ``every`` > 0); see ``difflo eval``."""
    every: int = 0                     # evaluate the EMA weights every K steps (0: never)
    n: int = 500                       # samples per evaluation, class-balanced, seeds seed..seed+n-1
    steps: int = 25                    # sampler steps (sampler and w: the sample section's)
    features: str = "classifier"       # classifier: fd_classifier (fast) | inception: FID (~3 img/s on 2 CPU cores)
    classifier: str | None = None      # None: $XDG_CACHE_HOME/difflo/classifiers/<data>.safetensors (else ~/.cache/...), trained on first use
    ref_split: str = "test"            # reference statistics: this split of the training data set
    ref_n: int | None = None           # reference images (None: the whole split)
    seed: int = 0


DISTILL_METHODS = ("progressive", "reflow")   # difflo.distill's methods (`difflo distill --method`)


@dataclass
class DistillConfig:
    """What ``difflo distill`` made this model from (:mod:`difflo.distill`): all None for a trained model, and then
    left out of the written config, so an ordinary run's config.yaml and checkpoints are what they were."""
    teacher: str | None = None         # the teacher's --ckpt: its absolute path, or demo
    method: str | None = None          # progressive (Salimans & Ho 2022) | reflow (Liu et al. 2023)
    steps: int | None = None           # the sampling steps it was distilled for (sample.steps is set to it)
    teacher_steps: int | None = None   # progressive: the teacher's DDIM steps of the first round; reflow: its ODE steps
    w: float | None = None             # the guidance scale distilled in (the student samples with w = 1), or with
                                       # w_range the default w of a student that takes w as an input
    w_range: tuple[float, ...] = ()    # [lo, hi]: the student takes w in this range as an input (model.guidance_input)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        d = _plain(dataclasses.asdict(self))
        if self.distill == DistillConfig():      # a trained model: no distill section
            d.pop("distill")
        return d

    def validate(self) -> None:
        """Raise ConfigError listing every out-of-range value."""
        problems = list(self.model.validate())
        d, t, s = self.diffusion, self.train, self.sample
        # The objective's path class says what it accepts (an unknown objective is reported below, and the
        # rest is checked against the default objective's class).
        path = PATHS.get(d.objective, PATHS[DiffusionConfig.objective])
        fitting = samplers_for(d.objective) if d.objective in OBJECTIVES else tuple(samplers.SAMPLERS)
        choices = [("diffusion.objective", d.objective, OBJECTIVES),
                   ("diffusion.schedule", d.schedule, schedules.BETA_SCHEDULES),
                   ("diffusion.prediction", d.prediction, path.predictions),
                   ("diffusion.loss_weighting", d.loss_weighting, path.loss_weightings),
                   ("diffusion.t_sampling", d.t_sampling, path.t_samplings),
                   ("train.lr_schedule", t.lr_schedule, LR_SCHEDULES),
                   ("train.precision", t.precision, precision.PRECISIONS),
                   ("sample.precision", s.precision, precision.PRECISIONS),
                   ("sample.sampler", s.sampler, fitting),
                   ("sample.spacing", s.spacing, schedules.SPACING_CHOICES),
                   ("sample.step_rule", s.step_rule, schedules.STEP_RULES),
                   ("sample.grid_end", s.grid_end, schedules.GRID_ENDS),
                   ("sample.variance", s.variance, samplers.VARIANCES),
                   ("eval.features", self.eval.features, FEATURES)]
        for key, value, allowed in choices:
            if value not in allowed:
                why = f" for diffusion.objective={d.objective}" if key != "diffusion.objective" else ""
                problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}{why}")
        positive = [("diffusion.timesteps", d.timesteps), ("train.steps", t.steps),
                    ("train.batch_size", t.batch_size), ("train.lr", t.lr), ("train.log_every", t.log_every),
                    ("train.ckpt_every", t.ckpt_every), ("train.keep_checkpoints", t.keep_checkpoints),
                    ("train.max_nonfinite_steps", t.max_nonfinite_steps), ("train.grad_accum", t.grad_accum),
                    ("sample.steps", s.steps), ("eval.steps", self.eval.steps)]
        problems += [f"{k}={v} must be > 0" for k, v in positive if v <= 0]
        nonneg = [("train.warmup_steps", t.warmup_steps), ("train.weight_decay", t.weight_decay),
                  ("train.grad_clip", t.grad_clip), ("train.sample_every", t.sample_every),
                  ("sample.eta", s.eta), ("diffusion.min_snr_gamma", d.min_snr_gamma),
                  ("train.offset_noise", t.offset_noise), ("sample.s_churn", s.s_churn),
                  ("sample.steps_offset", s.steps_offset),
                  ("eval.every", self.eval.every)]
        problems += [f"{k}={v} must be >= 0" for k, v in nonneg if v < 0]
        if t.grad_accum > 0 and t.batch_size > 0 and t.batch_size % t.grad_accum:
            problems.append(f"train.grad_accum={t.grad_accum} must be a divisor of train.batch_size={t.batch_size} "
                            f"(the batch is split into grad_accum equal micro-batches)")
        if any(w not in ("csv", "tensorboard") for w in t.log) or "csv" not in t.log:
            problems.append(f"train.log={list(t.log)} must be [csv] or [csv, tensorboard] (metrics.csv is always "
                            f"written: loss.png, --resume and difflo experiment read it)")
        if t.lr_schedule == "exponential" and t.min_lr_ratio <= 0:
            problems.append("train.min_lr_ratio must be > 0 for the exponential lr schedule")
        for key, value in [("train.label_dropout", t.label_dropout), ("train.ema_decay", t.ema_decay),
                           ("train.min_lr_ratio", t.min_lr_ratio)]:
            if not 0.0 <= value <= 1.0:
                problems.append(f"{key}={value} must be in [0, 1]")
        if d.logit_std <= 0:
            problems.append(f"diffusion.logit_std={d.logit_std} must be > 0")
        if not (0.0 < d.beta_start < 1.0 and 0.0 < d.beta_end < 1.0):
            problems.append(f"diffusion.beta_start={d.beta_start} and beta_end={d.beta_end} must lie in (0, 1)")
        if d.schedule == "explicit":
            if len(d.betas) != d.timesteps or not all(0.0 < b < 1.0 for b in d.betas):
                problems.append(f"diffusion.schedule=explicit needs diffusion.betas: diffusion.timesteps="
                                f"{d.timesteps} values in (0, 1) (got {len(d.betas)})")
        elif d.betas:
            problems.append(f"diffusion.betas is read only with diffusion.schedule=explicit (schedule is "
                            f"{d.schedule!r})")
        if d.zero_terminal_snr and (not path.beta_schedule or d.prediction == "eps"):
            problems.append(f"diffusion.zero_terminal_snr=true needs objective diffusion with prediction v or x0 "
                            f"(got {d.objective}, {d.prediction}): at alpha_T = 0 an eps prediction says nothing "
                            f"about x0; use diffusion.prediction=v (Lin et al. 2024)")
        if d.zero_terminal_snr and s.spacing in schedules.SIGMA_SPACINGS:
            problems.append(f"sample.spacing={s.spacing} needs a finite largest noise level; with "
                            f"diffusion.zero_terminal_snr use trailing")
        if not path.timestep_grids and (s.steps_offset, s.step_rule, s.grid_end) != (0, "listed", "clean"):
            problems.append(f"sample.steps_offset={s.steps_offset}, step_rule={s.step_rule} and grid_end={s.grid_end} "
                            f"are settings of diffusion timestep grids; objective {d.objective} takes 0, listed, clean")
        elif s.spacing == "leading" and s.steps_offset > 0 and 0 < s.steps <= d.timesteps:
            try:                                         # the grid says whether the offset fits
                schedules.timesteps(d.timesteps, s.steps, "leading", s.steps_offset)
            except ValueError as e:
                problems.append(f"sample.{e}")
        if s.s_noise <= 0 or s.s_tmin > s.s_tmax:
            problems.append(f"sample.s_noise={s.s_noise} must be > 0 and sample.s_tmin={s.s_tmin} <= "
                            f"sample.s_tmax={s.s_tmax}")
        problems += guidance_problems(s.guidance_interval, s.guidance_rescale)
        if d.clip_range <= 0:
            problems.append(f"diffusion.clip_range={d.clip_range} must be > 0")
        problems += edm_problems(d, s, path)
        if path.max_steps_for(d) is not None and s.steps > path.max_steps_for(d):
            problems.append(f"sample.steps={s.steps} exceeds diffusion.timesteps={d.timesteps}")
        if t.max_minutes is not None and t.max_minutes <= 0:
            problems.append(f"train.max_minutes={t.max_minutes} must be > 0")
        try:
            parse_colour(self.data.background)
        except DiffloError as e:
            problems.append(str(e))
        if self.data.per_class is not None and self.data.per_class < 1:
            problems.append(f"data.per_class={self.data.per_class} must be >= 1 (or null for every image)")
        if self.eval.n < 2 or (self.eval.ref_n is not None and self.eval.ref_n < 2):
            problems.append("eval.n and eval.ref_n must be >= 2 (a covariance needs two samples)")
        if len(t.adam_betas) != 2:
            problems.append("train.adam_betas must have two values, e.g. [0.9, 0.999]")
        elif not all(0.0 <= b < 1.0 for b in t.adam_betas):
            problems.append(f"train.adam_betas={list(t.adam_betas)} must lie in [0, 1), e.g. [0.9, 0.999]")
        sigma_rels = t.posthoc_ema
        if any(not 0 < v <= posthoc_ema.SIGMA_REL_MAX for v in sigma_rels) or len(set(sigma_rels)) < len(sigma_rels):
            problems.append(f"train.posthoc_ema={list(t.posthoc_ema)} must be distinct sigma_rels in "
                            f"(0, {posthoc_ema.SIGMA_REL_MAX:.4f}], e.g. [0.05, 0.1]")
        if t.posthoc_every is not None and (t.posthoc_every <= 0 or not t.posthoc_ema):
            problems.append(f"train.posthoc_every={t.posthoc_every} must be > 0 and is read only with "
                            f"train.posthoc_ema")
        if not 0 <= t.seed < 2**32:
            problems.append(f"train.seed={t.seed} must be in 0..2^32-1")
        ds = self.distill
        if ds != DistillConfig() and (ds.method not in DISTILL_METHODS or ds.steps is None or ds.steps < 1):
            problems.append(f"distill.method={ds.method} and distill.steps={ds.steps}: a distilled model records one "
                            f"of {', '.join(DISTILL_METHODS)} and its steps (>= 1)")
        if ds.w_range and not (len(ds.w_range) == 2 and 0 <= ds.w_range[0] < ds.w_range[1]):
            problems.append(f"distill.w_range={list(ds.w_range)} must be [lo, hi] with 0 <= lo < hi")
        if bool(ds.w_range) != self.model.guidance_input:
            problems.append(f"model.guidance_input={self.model.guidance_input} and distill.w_range="
                            f"{list(ds.w_range)}: a network takes w as an input exactly when it was distilled "
                            f"for a range of w")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))


def parse_interval(text: str) -> tuple[float, ...]:
    """A guidance interval as text, ``LO,HI`` (two finite numbers; their range is checked with the settings:
    :func:`guidance_problems`) or ``off`` (empty: guidance at every noise level); else ValueError."""
    if text.strip().lower() in ("off", "none"):
        return ()
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"expected two finite numbers LO,HI (e.g. 0.3,3) or off, got {text!r}")
    return values


def guidance_problems(interval, rescale, names=("sample.guidance_interval", "sample.guidance_rescale")) -> list[str]:
    """What is wrong with a guidance interval [lo, hi] (empty: everywhere; 0 <= lo <= hi) and a guidance
    rescale phi (in [0, 1]); ``names``: the keys (or flags) to name."""
    problems = []
    if len(interval) not in (0, 2) or (interval and not 0 <= interval[0] <= interval[1]):
        problems.append(f"{names[0]}={','.join(f'{v:g}' for v in interval)} must be two noise levels lo,hi "
                        f"(sigma/alpha) with 0 <= lo <= hi, e.g. 0.3,3")
    if not 0.0 <= rescale <= 1.0:
        problems.append(f"{names[1]}={rescale:g} must be in [0, 1]")
    return problems


def edm_problems(d: DiffusionConfig, s: SampleConfig, path) -> list[str]:
    """EDM's keys (``edm.DEFAULTS``): in range for objective edm, left at their defaults for the others; and an EDM
    grid is in sigma (sample.spacing karras or exponential)."""
    if path is not EDMPath:
        changed = [f"diffusion.{k}={getattr(d, k):g}" for k, v in EDM_DEFAULTS.items() if getattr(d, k) != v]
        return [f"{', '.join(changed)}: read only with diffusion.objective=edm"] if changed else []
    problems = []
    if not (d.sigma_data > 0 and d.p_std > 0 and d.rho > 0):
        problems.append(f"diffusion.sigma_data={d.sigma_data:g}, p_std={d.p_std:g} and rho={d.rho:g} must be > 0")
    if not 0 < d.sigma_min < d.sigma_max:
        problems.append(f"diffusion.sigma_min={d.sigma_min:g} and sigma_max={d.sigma_max:g} must satisfy "
                        f"0 < sigma_min < sigma_max")
    if s.spacing not in EDMPath.spacings:
        problems.append(f"sample.spacing={s.spacing} does not apply to objective edm (its grid is in sigma): "
                        f"use {' or '.join(EDMPath.spacings)}")
    return problems


def _plain(obj):
    """Tuples -> lists, recursively (for YAML/JSON)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r} ({type(value).__name__})")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:           # an int beyond float's range
                number = math.inf
        elif isinstance(value, str):        # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be of type {getattr(tp, '__name__', tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _set_section(section, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(_unknown(f"{prefix}.{key}", [f"{prefix}.{k}" for k in hints]))
        setattr(section, key, _coerce(value, hints[key], f"{prefix}.{key}"))


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(known)}"
    return f"unknown config key {key!r}{hint}"


def all_keys() -> list[str]:
    cfg = Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, s.name))]


def from_dict(d: dict | None) -> Config:
    """A Config from a nested mapping; unknown keys and wrong types raise ConfigError."""
    cfg = Config()
    if d is None:
        return cfg
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping with sections {', '.join(_sections())}, got {type(d).__name__}")
    for name, values in d.items():
        if name not in _sections():
            raise ConfigError(_unknown(str(name), _sections()))
        _set_section(getattr(cfg, name), values or {}, name)
    return cfg


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``3e-4``, ``[1,2]``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in _sections():
            raise ConfigError(_unknown(key, all_keys()))
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_section(getattr(cfg, parts[0]), {parts[1]: value}, parts[0])
    return cfg


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when path is None) and apply overrides."""
    d = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see configs/ for examples")
        try:
            d = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return apply_overrides(from_dict(d), list(overrides))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
