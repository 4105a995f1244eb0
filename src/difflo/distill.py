"""Few-step students distilled from a trained model (``difflo distill``): progressive distillation and reflow.

**Progressive distillation** (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2 and Sec. 3-4), for discrete-time diffusion models (:class:`~difflo.diffusion.DiscreteSchedule`,
any prediction eps / x0 / v). A round teaches a student to take in one deterministic DDIM step what its teacher
takes in two: with x0 from the training data, eps ~ N(0, I), a student step i of N drawn uniformly per sample,

* the times t = t_i, t' and t'' = t_{i-1}: steps i and i-1 of the **trailing grid of N steps**, t' the time between
  them on the trailing grid of 2N steps (``path.sampling_times(2N, "trailing")``, the grid difflo's DDIM samples
  on; the N-step grid is every other time of it, checked), t'' = -1 (the clean data) for the last step;
* z_t = alpha_t x0 + sigma_t eps (:func:`difflo.diffusion.q_sample`);
* two deterministic teacher DDIM steps (Song et al. 2021, Eq. 12 with eta = 0) with the teacher's guided x0
  prediction x0_hat (classifier-free guidance with a fixed scale w: :func:`difflo.model.make_denoiser` with
  ``clip_x0=False``): z_t' = alpha_t' x0_hat(z_t) + sigma_t' (z_t - alpha_t x0_hat(z_t)) / sigma_t, then z_t'' from
  z_t' the same way;
* the target x0~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t) (Algorithm 2): the x0
  with which one DDIM step from z_t lands on z_t'' exactly (at t'' = -1, alpha = 1 and sigma = 0: x0~ = z_t'');
* the loss max(SNR_t, 1) ||x0_hat_student(z_t) - x0~||^2 (Sec. 4, "truncated SNR" weighting, SNR = alpha^2 / sigma^2,
  the mean over pixels), the student's x0 read from its own prediction by the path (:func:`difflo.diffusion.to_x0`).
  The student keeps the teacher's prediction (it is a copy of its network); an eps-prediction one works badly at low
  SNR (Sec. 4: x0 = (z - sigma eps) / alpha), and a note says so.

The student starts as a copy of the teacher's network; after a round it is the next round's teacher and takes
half the steps (N0 -> N0/2 -> ... over ``rounds``; N0 a power of two). Each round has its own AdamW, its learning
rate annealed linearly from ``lr`` towards 0 over the round's steps (the paper anneals linearly per round). A
student of a student continues halving from the steps its config records (``distill.steps``).

**Guidance is distilled in with a fixed w** (the teacher's ``sample.w`` by default): the targets come from the
guided teacher (plain classifier-free guidance; a teacher's ``sample.guidance_interval``/``guidance_rescale`` are
not distilled, and a note says so) and the student is trained on the data's labels, so it samples with w = 1 (one
network call per step) and its null class is not trained (guiding the student again means nothing and is refused;
a distilled teacher takes w 1).

**Or with w as an input** (``--w-range LO,HI``; Meng et al. 2023, "On Distillation of Guided Diffusion Models",
Sec. 3.1-3.2): each training sample draws its own w ~ U[LO, HI]; the teacher's target is guided at that w and the
student gets w as an input (``model.guidance_input``: an embedding of w added to the time embedding, its last layer
zero at the start, so the new student equals its teacher's conditional prediction at every w). The student then
samples at any w in the range with one network call per step (``--w`` at sampling time; its default is ``--w``
here, or the teacher's ``sample.w``). A student of such a student keeps the range.

**Reflow** (Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
Flow", Sec. 2.2-3), for flow models (:class:`~difflo.flow.FlowPath`, u-prediction): pairs (z, x) of noise z and the
teacher's ODE endpoint x from it (Euler or Heun, ``pair_steps`` steps, guidance w, generated once by
:func:`difflo.generate.generate` with per-sample seeds ``seed + i`` and class ``i mod num_classes``, cached in
``OUT/pairs.npz``); then the student (a copy of the teacher) is trained with the flow loss on the straight line
between each pair: x_t = (1 - t) x + t z, ||u(x_t, t) - (z - x)||^2 with t drawn as the teacher was trained
(:func:`difflo.flow.sample_t`). The student samples with 1, 2 or 4 Euler steps at w = 1.

**The student is a normal difflo checkpoint** (:func:`difflo.checkpoint.save_checkpoint`; both weight files hold the
student's weights: no EMA): its config is the teacher's with ``distill`` = {teacher, method, steps, teacher_steps, w}
(:class:`difflo.config.DistillConfig`) and ``sample`` = DDIM (progressive) or Euler (reflow), ``steps`` = the
distilled steps, trailing spacing, w = 1, so ``difflo sample --ckpt OUT`` samples as it was distilled.
``OUT/checkpoints/`` holds the newest checkpoints (what ``--resume`` continues, exactly: the data order, noise and
times of step k come from generators seeded by (seed, k), as in :mod:`difflo.train`), and progressive distillation
keeps each round's final student in ``OUT/students/steps_N`` (any ``--ckpt`` form).

Precision: float32 throughout (no autocast). A diffusers teacher folder is refused for now (its network is not a
difflo UNet, so its student could not be a difflo checkpoint).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, config as config_mod, data as data_mod, guards, pretrained
from .diffusion import DiscreteSchedule, per_sample, q_sample, target
from .errors import DiffloError
from .flow import FlowPath, sample_t
from .generate import generate, settings_for
from .guidance import CFGDenoiser, GuidanceInput, ModelDenoiser
from .io import atomic_path, check_writable, write_text_atomic
from .model import Model, build_net, load_model, make_denoiser, pick_device
from .samplers import SeededNoise
from .train import batch_indices

METHODS = config_mod.DISTILL_METHODS
PAIR_SAMPLERS = ("euler", "heun")         # the teacher's ODE solvers for reflow pairs (deterministic: no churn)
STUDENT_STEPS = (1, 2, 4)                 # reflow: the Euler steps a student samples with by default
PAIRS_FILE = "pairs.npz"
LOG_FILE = "distill.csv"
LOG_FIELDS = ["step", "round", "student_steps", "loss", "lr", "elapsed_s"]


@dataclasses.dataclass
class DistillOptions:
    """The settings of one distillation (``difflo distill``'s flags). ``None``: the method's default or not
    read by the method (:func:`check_options`)."""
    teacher: str
    method: str
    w: float | None = None                # guidance distilled in (default: the teacher's sample.w)
    w_range: tuple[float, float] | None = None   # progressive: w as a student input, drawn in [lo, hi]
    lr: float = 1e-3                      # measured on the demo: README "Few-step students"
    batch_size: int | None = None         # default: the teacher's train.batch_size
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 50
    ema: bool = True                      # the teacher's EMA weights
    # progressive
    teacher_steps: int | None = None      # N0 (default 32, or the recorded steps of a distilled teacher)
    rounds: int | None = None             # default 3 (fewer where the teacher's steps reach 1 sooner)
    steps_per_round: int | None = None    # default 1000
    # reflow
    pairs: int | None = None              # default 1024
    pair_steps: int | None = None         # default 20
    pair_sampler: str | None = None       # default heun
    student_steps: int | None = None      # default 2
    train_steps: int | None = None        # default 2000


PROGRESSIVE_DEFAULTS = {"teacher_steps": 32, "rounds": 3, "steps_per_round": 1000, "w_range": None}
REFLOW_DEFAULTS = {"pairs": 1024, "pair_steps": 20, "pair_sampler": "heun", "student_steps": 2, "train_steps": 2000}
DECIDED_LATER = ("teacher_steps", "rounds", "w_range")    # their defaults depend on the teacher (progressive())
OWN = {"progressive": PROGRESSIVE_DEFAULTS, "reflow": REFLOW_DEFAULTS}    # the options only that method reads


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(o: DistillOptions) -> DistillOptions:
    """One-line DiffloErrors for an unknown method or an option of the other method; returns the options with the
    method's defaults filled in (but ``teacher_steps`` and ``rounds``, which depend on the teacher:
    :func:`progressive`)."""
    if o.method not in METHODS:
        raise DiffloError(f"unknown distillation method {o.method!r}; choose one of {', '.join(METHODS)}")
    for method, own in OWN.items():
        if method != o.method:
            given = [flag(k) for k in own if getattr(o, k) is not None]
            if given:
                raise DiffloError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of "
                                  f"--method {method}, not {o.method}")
    filled = {k: v for k, v in OWN[o.method].items() if getattr(o, k) is None and k not in DECIDED_LATER}
    o = dataclasses.replace(o, **filled)
    if o.method == "reflow" and o.pair_sampler not in PAIR_SAMPLERS:
        raise DiffloError(f"--pair-sampler {o.pair_sampler}: choose one of {', '.join(PAIR_SAMPLERS)}")
    if o.w_range is not None and not (len(o.w_range) == 2 and 0 <= o.w_range[0] < o.w_range[1]):
        raise DiffloError(f"--w-range {','.join(f'{v:g}' for v in o.w_range)}: give LO,HI with 0 <= LO < HI, "
                          f"e.g. 1,4")
    if o.method == "reflow" and o.student_steps not in STUDENT_STEPS:
        raise DiffloError(f"--student-steps {o.student_steps}: choose one of {', '.join(map(str, STUDENT_STEPS))}")
    return o


# ----------------------------------------------------------------------------- the teacher
def distilled_w(teacher: Model, w: float | None) -> float:
    """The guidance scale the teacher's targets use: ``w`` (default its sample.w; a distilled teacher has its guidance
    in already and takes w 1; an unguided teacher takes none), as one-line DiffloErrors. For a teacher that takes w
    as an input, the student's default w (in the teacher's range)."""
    done = teacher.cfg.distill
    if teacher.cfg.model.guidance_input:
        w = done.w if w is None else float(w)
        if not done.w_range[0] <= w <= done.w_range[1]:
            raise DiffloError(f"--w {w:g}: the teacher takes w in [{done.w_range[0]:g}, {done.w_range[1]:g}]; choose a "
                              f"w in that range")
        return w
    if done.method is not None:
        if w is not None and w != 1.0:
            raise DiffloError(f"--w {w:g}: the teacher is a distilled student with guidance w={done.w:g} distilled "
                              f"in (its null class is not trained); distil it with --w 1 (the default)")
        return 1.0
    if not cfg_guided(teacher):
        if w is not None and w != 1.0:
            raise DiffloError(f"--w {w:g}: this teacher has no null class (it is "
                              + ("unconditional" if teacher.num_classes == 0 else "a diffusers model without one")
                              + "), so there is no guidance to distil; drop --w")
        return 1.0
    return float(teacher.cfg.sample.w if w is None else w)


def cfg_guided(teacher: Model) -> bool:
    """Whether classifier-free guidance can guide the teacher: it has classes and a null class."""
    return teacher.num_classes > 0 and teacher.has_null_class


def recorded_w(teacher: Model, w: float) -> float:
    """The guidance the student has in it: ``w``, or a distilled teacher's own (for a student that takes w as an
    input: its default w)."""
    return teacher.cfg.distill.w if teacher.cfg.distill.method is not None and not teacher.cfg.model.guidance_input \
        else w


def distilled_w_range(teacher: Model, o: DistillOptions, w: float) -> tuple[float, float] | None:
    """``--w-range``, checked against the teacher (one-line DiffloErrors): None for a fixed-w student; a teacher that
    takes w as an input passes its range on; the student's default w must lie in the range."""
    if teacher.cfg.model.guidance_input:
        own = tuple(teacher.cfg.distill.w_range)
        if o.w_range is not None and tuple(o.w_range) != own:
            raise DiffloError(f"--w-range {','.join(f'{v:g}' for v in o.w_range)}: the teacher takes w in "
                              f"[{own[0]:g}, {own[1]:g}] and its student keeps that range; drop --w-range")
        return own
    if o.w_range is None:
        return None
    if teacher.cfg.distill.method is not None or not cfg_guided(teacher):
        what = ("a distilled student with a fixed w in it" if teacher.cfg.distill.method is not None else
                "without a null class, so it has no guidance")
        raise DiffloError(f"--w-range: the teacher is {what}; a w range needs a teacher guided by classifier-free "
                          f"guidance")
    lo, hi = (float(v) for v in o.w_range)
    if not lo <= w <= hi:
        raise DiffloError(f"--w {w:g} (the student's default w) lies outside --w-range {lo:g},{hi:g}; give a --w in the "
                          f"range")
    return lo, hi


def load_teacher(o: DistillOptions, device) -> Model:
    """The teacher model, checked to fit the method (one-line DiffloErrors)."""
    teacher = load_model(o.teacher, ema=o.ema, device=device)
    if pretrained.foreign_net(teacher.net) is not None:
        raise DiffloError(f"--ckpt {o.teacher} is a diffusers model folder: difflo distill writes its student as a "
                          f"difflo checkpoint and needs a difflo-trained teacher (a run, checkpoint or demo)")
    wants = {"progressive": DiscreteSchedule, "reflow": FlowPath}[o.method]
    if not isinstance(teacher.path, wants):
        other = {"progressive": "reflow", "reflow": "progressive"}[o.method]
        fits = {DiscreteSchedule: "diffusion", FlowPath: "flow"}[wants]
        hint = f"; use --method {other}" if isinstance(teacher.path, (DiscreteSchedule, FlowPath)) else ""
        raise DiffloError(f"--method {o.method} distils diffusion.objective={fits} models; this teacher is a "
                          f"{teacher.objective} model{hint}")
    teacher.net.eval().requires_grad_(False)
    return teacher


def teacher_ref(path: str) -> str:
    """The teacher as the config records it: ``demo``, or the absolute path."""
    return path if str(path) == checkpoint.DEMO else str(Path(path).resolve())


# ----------------------------------------------------------------------------- progressive: the numerics
def round_steps(n0: int, rounds: int) -> list[int]:
    """The student steps of each round: n0/2, n0/4, ..., n0/2^rounds (n0 a power of two; one-line DiffloErrors)."""
    if n0 < 2 or n0 & (n0 - 1):
        raise DiffloError(f"--teacher-steps {n0} must be a power of two >= 2 (each round halves the steps)")
    if n0 >> rounds < 1:
        raise DiffloError(f"--rounds {rounds} from {n0} teacher steps would go below 1 student step; use at most "
                          f"--rounds {n0.bit_length() - 1}")
    return [n0 >> (r + 1) for r in range(rounds)]


def step_times(path: DiscreteSchedule, n: int) -> torch.Tensor:
    """(n, 3) int64: for each student step of the n-step trailing grid (noise end first), its time t, the teacher's
    midpoint t' and its end t'' (-1: the clean data), from ``path.sampling_times`` of 2n and n steps."""
    if 2 * n > path.max_steps:
        raise DiffloError(f"{2 * n} teacher steps exceed the model's {path.max_steps} timesteps; use fewer "
                          f"--teacher-steps")
    fine, coarse = path.sampling_times(2 * n, "trailing"), path.sampling_times(n, "trailing")
    if list(fine[::2]) != list(coarse):
        raise DiffloError(f"the trailing grid of {n} steps is not every other time of the {2 * n}-step grid for "
                          f"T={path.max_steps}; choose --teacher-steps dividing T")
    return torch.tensor([[fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]] for i in range(n)], dtype=torch.long)


def ddim_to(x: torch.Tensor, x0: torch.Tensor, path, t, t_next) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, Eq. 12, eta = 0) with per-sample times (tensors (B,)) or one
    time: x_next = alpha_next x0 + sigma_next (x - alpha_t x0) / sigma_t (:func:`difflo.samplers.ddim_step`)."""
    a, s = (per_sample(c, x) for c in path.alpha_sigma(t))
    a_n, s_n = (per_sample(c, x) for c in path.alpha_sigma(t_next))
    return a_n * x0 + s_n * (x - a * x0) / s


def two_step_target(teacher, z: torch.Tensor, t, t_mid, t_end, extra_args: dict | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t'', x0~): two teacher DDIM steps z_t -> z_t' -> z_t'' with the denoiser ``teacher`` (its ``path``), and the
    x0 with which one DDIM step from z_t lands on z_t'' (Algorithm 2). Times: Python numbers or (B,) tensors."""
    path, extra = teacher.path, extra_args or {}
    z_mid = ddim_to(z, teacher(z, t, **extra), path, t, t_mid)
    z_end = ddim_to(z_mid, teacher(z_mid, t_mid, **extra), path, t_mid, t_end)
    a, s = (per_sample(c, z) for c in path.alpha_sigma(t))
    a_e, s_e = (per_sample(c, z) for c in path.alpha_sigma(t_end))
    ratio = s_e / s
    return z_end, (z_end - ratio * z) / (a_e - ratio * a)


def truncated_snr_weight(path, t) -> torch.Tensor:
    """max(SNR_t, 1) = max(alpha_t^2 / sigma_t^2, 1) (Salimans & Ho 2022, Sec. 4), (B,) float64."""
    a, s = path.alpha_sigma(t)
    return (a * a / (s * s)).clamp(min=1.0)


def progressive_loss(student, teacher, x0: torch.Tensor, y, n: int, generator: torch.Generator | None
                     ) -> torch.Tensor:
    """The distillation loss of a batch x0 (B, C, H, W) for an n-step student: per sample a step i, eps, z_t, the
    teacher's target x0~ (no gradient) and max(SNR_t, 1) ||x0_student(z_t) - x0~||^2 (mean over pixels and batch).
    ``student``/``teacher``: denoisers (x0 predictions) on the same path; draws: step indices, then eps."""
    path, B = teacher.path, x0.shape[0]
    dev = generator.device if generator is not None else "cpu"
    times = step_times(path, n)[torch.randint(0, n, (B,), generator=generator, device=dev).cpu()]   # (B, 3)
    t, t_mid, t_end = times.unbind(1)
    eps = torch.randn(x0.shape, generator=generator, device=dev).to(x0.device, x0.dtype)
    alpha, sigma = path.alpha_sigma(t)
    z = q_sample(x0, eps, alpha, sigma).to(x0.dtype)
    with torch.no_grad():
        _, x0_target = two_step_target(teacher, z, t, t_mid, t_end, {"y": y})
    x0_hat = student(z, t, y=y)
    mse = (x0_hat.float() - x0_target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))       # (B,)
    return (truncated_snr_weight(path, t).to(mse) * mse).mean()


# ----------------------------------------------------------------------------- reflow: the numerics
def make_pairs(teacher: Model, n: int, seed: int, sampler: str, steps: int, w: float, batch_size: int = 250
               ) -> dict[str, torch.Tensor]:
    """{noise, ends, labels, seeds}: pair i is the noise z_i of seed ``seed + i`` (the first draw of its
    :class:`~difflo.samplers.SeededNoise`, as :func:`~difflo.generate.generate` starts from it) and the teacher's
    deterministic ODE endpoint from it (``sampler`` with ``steps`` steps, guidance w, float32, no churn), for class
    i mod num_classes."""
    labels = torch.arange(n) % max(teacher.num_classes, 1)
    seeds = [seed + i for i in range(n)]
    settings = settings_for(teacher, sampler=sampler, steps=steps, w=w, s_churn=0.0, precision="fp32")
    ends = generate(teacher, labels, seeds, settings, batch_size=batch_size)
    shape = (teacher.cfg.model.in_channels, teacher.cfg.model.image_size, teacher.cfg.model.image_size)
    noise = torch.cat([SeededNoise(seeds[i:i + batch_size], shape)() for i in range(0, n, batch_size)])
    return {"noise": noise * teacher.path.prior_std, "ends": ends.float(), "labels": labels,
            "seeds": torch.tensor(seeds, dtype=torch.long)}


def reflow_loss(net, path: FlowPath, noise: torch.Tensor, ends: torch.Tensor, y, d, generator) -> torch.Tensor:
    """The flow loss on the straight line between pairs (noise z at t = 1, the teacher's endpoint x at t = 0):
    x_t = (1 - t) x + t z, ||net(x_t, t, y) - (z - x)||^2, t drawn as ``d`` (a DiffusionConfig) says."""
    t = sample_t(ends.shape[0], d.t_sampling, generator, d.logit_mean, d.logit_std).to(ends.device)
    alpha, sigma = path.alpha_sigma(t)
    x_t = q_sample(ends, noise, alpha, sigma).to(ends.dtype)
    out = net(path.network_input(x_t, alpha, sigma), path.model_time(t), y)
    return (out.float() - target(ends, noise, alpha, sigma, "u").float()).pow(2).mean()


# ----------------------------------------------------------------------------- the student's config
def student_config(teacher: Model, o: DistillOptions, steps: int, w: float, teacher_steps: int,
                   w_range: tuple[float, float] | None = None) -> config_mod.Config:
    """The teacher's config with the ``distill`` record and the sample settings the student was distilled for (with
    ``w_range``: a network that takes w as an input, sampled at ``w`` by default)."""
    cfg = copy.deepcopy(teacher.cfg)
    sampler = "ddim" if o.method == "progressive" else "euler"
    cfg.sample = config_mod.SampleConfig(sampler=sampler, steps=steps, w=w if w_range else 1.0, spacing="trailing",
                                         clip_x0=teacher.cfg.sample.clip_x0, precision=teacher.cfg.sample.precision)
    cfg.model.guidance_input = w_range is not None
    cfg.distill = config_mod.DistillConfig(teacher=teacher_ref(o.teacher), method=o.method, steps=steps,
                                           teacher_steps=teacher_steps, w=w, w_range=tuple(w_range or ()))
    cfg.validate()
    return cfg


def student_net(teacher: Model, cfg: config_mod.Config) -> torch.nn.Module:
    """The first student: a copy of the teacher's network, or, for a student that takes w as an input while its
    teacher does not, the teacher's weights in a network with a w embedding whose last layer is zero (so it starts
    as the teacher's conditional prediction at every w)."""
    if cfg.model.guidance_input == teacher.cfg.model.guidance_input:
        return copy.deepcopy(teacher.net).requires_grad_(True)
    net = build_net(cfg).to(next(teacher.net.parameters()).device)
    missing, unexpected = net.load_state_dict(teacher.net.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("w_mlp.") for k in missing), (missing, unexpected)
    return net.requires_grad_(True)


def guided(net: torch.nn.Module, cfg: config_mod.Config, path, w) -> "ModelDenoiser | CFGDenoiser":
    """A round's teacher or student as a denoiser guided at ``w`` (a number, or (B,) tensor: one per sample): a network
    with a guidance input (``net.cfg.guidance_input``) takes w in (one call); any other is guided by classifier-free
    guidance with its null class (the library's :class:`~difflo.guidance.CFGDenoiser`)."""
    if net.cfg.guidance_input:
        return ModelDenoiser(GuidanceInput(net, w), path, cfg.diffusion.prediction)
    return CFGDenoiser(ModelDenoiser(net, path, cfg.diffusion.prediction), w, null_class=cfg.model.num_classes)


# ----------------------------------------------------------------------------- the runs
def recorded_options(o: DistillOptions) -> dict:
    """What a resumed distillation must repeat (everything but the logging and checkpoint cadence)."""
    d = dataclasses.asdict(o)
    d["teacher"] = teacher_ref(o.teacher)
    for k in ("ckpt_every", "log_every"):
        d.pop(k)
    return d


def start_out(out: Path, o: DistillOptions, resume: bool, log) -> tuple[Path | None, dict | None]:
    """The output folder: (its newest intact checkpoint, its train state) to resume from, or (None, None) for a
    fresh start. Refuses a folder that holds a run without --resume, and a --resume with other options."""
    existing = checkpoint.list_checkpoints(out)
    if existing and not resume:
        raise DiffloError(f"{out} already holds a run (checkpoint {existing[-1].name}); pass --resume to continue it "
                          f"or choose another --out")
    check_writable(out, "--out folder")
    if not existing:
        return None, None
    ckpt = checkpoint.latest_intact(existing, log)
    state = checkpoint.load_train_state(ckpt)
    before, now = state.get("distill_options"), recorded_options(o)
    if before != now:
        diff = [flag(k) for k in now if not isinstance(before, dict) or before.get(k) != now[k]]
        raise DiffloError(f"--resume: {out} was distilled with other options ({', '.join(diff)}), or not by difflo "
                          f"distill; repeat the original command's options")
    return ckpt, state


def start_log(path: Path, step: int) -> None:
    """A fresh distill.csv, or on resume the old one without the rows after ``step``."""
    rows = []
    if step and path.exists():
        with open(path) as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if len(r) == len(LOG_FIELDS) and r[0].isdigit() and int(r[0]) <= step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([LOG_FIELDS] + rows)


def log_row(path: Path, row: list) -> None:
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(row)


def optimizer(net: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, foreach=True)


def update(net, opt, loss: torch.Tensor, lr: float, grad_clip: float, step: int) -> None:
    """One AdamW step at ``lr`` (gradients clipped to ``grad_clip``; 0: off); a non-finite loss is an error."""
    if not torch.isfinite(loss):
        raise DiffloError(f"the distillation loss is not finite at step {step}; lower --lr")
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()


def seeds_of(o: DistillOptions, step: int, device) -> torch.Generator:
    """The generator of step k (the data order, noise and times), and the global RNG (dropout) seeded by (seed, k)."""
    torch.manual_seed(o.seed * 1_000_003 + step)
    return torch.Generator(device).manual_seed(o.seed * 1_000_003 + step)


def distill(o: DistillOptions, out: str | Path, resume: bool = False, device: str = "auto", log=print) -> Path | None:
    """Run a distillation into ``out``; returns the newest checkpoint directory (the final student; with a signal
    (:func:`difflo.guards.graceful_stop`), the checkpoint written when it stopped)."""
    o = check_options(o)
    dev = pick_device(device)
    teacher = load_teacher(o, dev)
    run = progressive if o.method == "progressive" else reflow
    return run(teacher, o, Path(out), resume, dev, log)


def progressive(teacher: Model, o: DistillOptions, out: Path, resume: bool, device, log) -> Path:
    """Progressive distillation, round after round (see the module docstring)."""
    w = distilled_w(teacher, o.w)
    w_range = distilled_w_range(teacher, o, w)
    recorded = teacher.cfg.distill.steps if teacher.cfg.distill.method == "progressive" else None
    if recorded is not None and o.teacher_steps not in (None, recorded):
        raise DiffloError(f"--teacher-steps {o.teacher_steps}: the teacher is a student distilled for {recorded} "
                          f"steps; its student halves from there (drop --teacher-steps)")
    if recorded == 1:
        raise DiffloError("the teacher is a 1-step student already: there are no steps left to halve")
    n0 = recorded or o.teacher_steps or PROGRESSIVE_DEFAULTS["teacher_steps"]
    rounds = o.rounds or max(1, min(PROGRESSIVE_DEFAULTS["rounds"], n0.bit_length() - 1))    # default: 3, or to 1 step
    o = dataclasses.replace(o, teacher_steps=n0, rounds=rounds, w_range=w_range)
    plan = round_steps(n0, o.rounds)
    step_times(teacher.path, plan[0])                        # the grids fit the schedule (one-line error)
    dataset = data_mod.from_config(teacher.cfg.data)
    m = teacher.cfg.model
    if (dataset.channels, dataset.image_size) != (m.in_channels, m.image_size):
        raise DiffloError(f"the teacher's data set {dataset.name} has {dataset.channels}-channel "
                          f"{dataset.image_size}px images; the teacher makes {m.in_channels}-channel {m.image_size}px "
                          f"ones")
    batch = o.batch_size or teacher.cfg.train.batch_size
    S, total = o.steps_per_round, o.steps_per_round * o.rounds
    ckpt, state = start_out(out, o, resume, log)

    configs = [student_config(teacher, o, n, recorded_w(teacher, w), n0, w_range) for n in plan]
    student = student_net(teacher, configs[0])
    round_teacher = teacher.net
    step, opt = 0, None
    if ckpt is not None:
        student.load_state_dict(checkpoint.load_weights(ckpt / "model.safetensors")[0])
        step = int(state["step"])
        if step % S and step // S:                           # mid-round after the first: that round's teacher
            round_teacher = copy.deepcopy(student).eval().requires_grad_(False)
            round_teacher.load_state_dict(state["round_teacher"])
        if step % S:
            opt = optimizer(student, o.lr)
            opt.load_state_dict(state["optimizer"])
        log(f"resuming {out} from step {step} ({ckpt.name})")
    log_path = out / LOG_FILE
    start_log(log_path, step)
    grad_clip = teacher.cfg.train.grad_clip
    guidance = f"w in [{w_range[0]:g}, {w_range[1]:g}] as an input" if w_range else f"w={w:g}"
    log(f"progressive distillation of {o.teacher} ({teacher.path.describe(teacher.cfg.diffusion)}, {guidance}): "
        f"{n0} DDIM steps -> {' -> '.join(map(str, plan))}, {S} steps of {batch} images per round, into {out}")
    if teacher.cfg.diffusion.prediction == "eps":
        log("note: an eps-prediction student reads x0 as (z - sigma eps) / alpha, which amplifies its errors where "
            "alpha is small (the first steps); Salimans & Ho 2022 (Sec. 4) distil x0- or v-prediction models")
    s = teacher.cfg.sample
    if s.guidance_interval or s.guidance_rescale:
        log(f"note: the teacher's sample.guidance_interval={list(s.guidance_interval)} and guidance_rescale="
            f"{s.guidance_rescale:g} are not distilled: the targets use plain classifier-free guidance at w={w:g}")
    student_den = ModelDenoiser(student, teacher.path, teacher.cfg.diffusion.prediction)
    teacher_den = None
    start, window = time.time(), []
    while step < total and not guards.stop_requested():        # SIGINT/SIGTERM: a checkpoint, then stop
        r, k = divmod(step, S)
        if k == 0:                                            # a new round: the last student teaches
            if r > 0:
                round_teacher = copy.deepcopy(student).eval().requires_grad_(False)
            opt, teacher_den = optimizer(student, o.lr), None
        if teacher_den is None and not w_range:               # the round's teacher, guided (the library's CFG)
            teacher_den = make_denoiser(Model(round_teacher, teacher.cfg), w, clip_x0=False)
        gen = seeds_of(o, step, device)
        x0, y = dataset.batch(batch_indices(step, len(dataset), batch, o.seed), device, gen)
        if w_range:                                           # one w per sample, U[lo, hi], for teacher and student
            ws = w_range[0] + (w_range[1] - w_range[0]) * torch.rand(len(y), generator=gen, device=gen.device)
            ws = ws.to(x0.device)
            teacher_den = guided(round_teacher, teacher.cfg, teacher.path, ws)
            student_den = guided(student, configs[r], teacher.path, ws)
        student.train()
        loss = progressive_loss(student_den, teacher_den, x0, y, plan[r], gen)
        lr = o.lr * (1 - k / S)
        update(student, opt, loss, lr, grad_clip, step)
        step += 1
        window.append(loss.item())
        log_row(log_path, [step, r, plan[r], f"{loss.item():.6f}", f"{lr:.3g}", f"{time.time() - start:.1f}"])
        end_of_round = step % S == 0
        if step % o.ckpt_every == 0 or end_of_round or guards.stop_requested():
            extra = {"round_teacher": round_teacher.state_dict()} if step % S and step // S else {}
            save(out, step, configs[r], student, opt if not end_of_round else None, o, extra)
        if end_of_round:
            path = checkpoint.save_checkpoint(out / "students" / f"steps_{plan[r]}", step, configs[r].to_dict(),
                                              student.state_dict(), student.state_dict(), {"step": step}, keep=1)
            log(f"round {r + 1}/{o.rounds}: {plan[r]}-step student at {path} (loss {np.mean(window):.4f})")
            window = []
        elif step % o.log_every == 0:
            log(f"step {step}/{total} (round {r + 1}, {plan[r]} steps): loss {np.mean(window):.4f}")
            window = []
    if step == total:
        write_text_atomic(out / "config.yaml", config_mod.dump(configs[-1]))
    ckpts = checkpoint.list_checkpoints(out)
    return ckpts[-1] if ckpts else None                       # None: stopped before the first step


def save(out: Path, step: int, cfg: config_mod.Config, student, opt, o: DistillOptions, extra: dict) -> Path:
    """A checkpoint of the student (both weight files: its weights) with the optimizer and the options in state.pt."""
    state = {"step": step, "distill_options": recorded_options(o), **extra}
    if opt is not None:
        state["optimizer"] = opt.state_dict()
    sd = student.state_dict()
    return checkpoint.save_checkpoint(out, step, cfg.to_dict(), sd, sd, state, keep=2)


def pairs_meta(o: DistillOptions, w: float) -> dict:
    return {"teacher": teacher_ref(o.teacher), "ema": o.ema, "w": w, "pairs": o.pairs, "pair_steps": o.pair_steps,
            "pair_sampler": o.pair_sampler, "seed": o.seed}


def cached_pairs(teacher: Model, o: DistillOptions, w: float, out: Path, log) -> dict[str, torch.Tensor]:
    """The reflow pairs: ``OUT/pairs.npz`` where it holds these pairs, else generated once and written there."""
    path, meta = out / PAIRS_FILE, pairs_meta(o, w)
    if path.exists():
        try:
            with np.load(path) as f:
                pairs = {k: torch.from_numpy(f[k]) for k in ("noise", "ends", "labels", "seeds")}
                stored = json.loads(str(f["meta"]))
        except (OSError, ValueError, KeyError) as e:
            raise DiffloError(f"{path} is not a readable pairs file ({e}); delete it to generate the pairs again") \
                from None
        if stored != meta:
            diff = [k for k in meta if stored.get(k) != meta[k]]
            raise DiffloError(f"{path} holds pairs made with other settings ({', '.join(diff)}); delete it or choose "
                              f"another --out")
        log(f"using the {len(pairs['seeds'])} cached pairs in {path}")
        return pairs
    t0 = time.time()
    pairs = make_pairs(teacher, o.pairs, o.seed, o.pair_sampler, o.pair_steps, w)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **{k: v.numpy() for k, v in pairs.items()})
    log(f"wrote {o.pairs} teacher pairs ({o.pair_sampler}, {o.pair_steps} steps, w={w:g}) to {path} in "
        f"{time.time() - t0:.1f}s")
    return pairs


def reflow(teacher: Model, o: DistillOptions, out: Path, resume: bool, device, log) -> Path:
    """Reflow: pairs from the teacher's ODE, then the flow loss on their straight lines (see the module docstring)."""
    w = distilled_w(teacher, o.w)
    batch = o.batch_size or teacher.cfg.train.batch_size
    ckpt, state = start_out(out, o, resume, log)
    pairs = cached_pairs(teacher, o, w, out, log)
    noise, ends, labels = (pairs[k].to(device) for k in ("noise", "ends", "labels"))
    cfg = student_config(teacher, o, o.student_steps, recorded_w(teacher, w), o.pair_steps)
    student = copy.deepcopy(teacher.net).requires_grad_(True)
    opt = optimizer(student, o.lr)
    step = 0
    if ckpt is not None:
        student.load_state_dict(checkpoint.load_weights(ckpt / "model.safetensors")[0])
        step = int(state["step"])
        opt.load_state_dict(state["optimizer"])
        log(f"resuming {out} from step {step} ({ckpt.name})")
    log_path = out / LOG_FILE
    start_log(log_path, step)
    log(f"reflow of {o.teacher} (w={w:g}) on {len(labels)} pairs: {o.train_steps} steps of {batch}, into {out}")
    start, window, total = time.time(), [], o.train_steps
    while step < total and not guards.stop_requested():        # SIGINT/SIGTERM: a checkpoint, then stop
        gen = seeds_of(o, step, device)
        idx = torch.from_numpy(batch_indices(step, len(labels), batch, o.seed)).to(device)
        student.train()
        loss = reflow_loss(student, teacher.path, noise[idx], ends[idx], labels[idx], teacher.cfg.diffusion, gen)
        lr = o.lr * (1 - step / total)
        update(student, opt, loss, lr, teacher.cfg.train.grad_clip, step)
        step += 1
        window.append(loss.item())
        log_row(log_path, [step, 0, o.student_steps, f"{loss.item():.6f}", f"{lr:.3g}", f"{time.time() - start:.1f}"])
        if step % o.ckpt_every == 0 or step == total or guards.stop_requested():
            save(out, step, cfg, student, opt, o, {})
        if step % o.log_every == 0 or step == total:
            log(f"step {step}/{total}: loss {np.mean(window):.4f}")
            window = []
    if step == total:
        write_text_atomic(out / "config.yaml", config_mod.dump(cfg))
    ckpts = checkpoint.list_checkpoints(out)
    return ckpts[-1] if ckpts else None                       # None: stopped before the first step
