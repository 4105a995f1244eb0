"""The edit techniques as one table, :data:`TECHNIQUES` (name -> :class:`Technique`), read by
``difflo edit`` and by the web page.

A technique is a subclass of :class:`Technique` that states, in one place:

- ``flags``: its own arguments of ``difflo edit NAME`` (:class:`Flag`; :class:`OneOf` for a mutually
  exclusive group), after the shared ones its attributes ask for (``tries``: --seed/--n; the model's
  --device/--precision/--no-ema; ``w``: --w/--sampler/--no-clip/--guidance-*; ``times``: the time grid).
  :meth:`Technique.all_flags` is the whole list in the order ``difflo edit NAME --help`` shows it;
  ``cli/edit.py`` adds them in a loop after the front end's own --ckpt, --null-class, --out, --figure;
- ``page``: the fields the web page sends for it (:class:`Field`: JSON name, kind, bounds, default), or
  ``None`` where the page does not offer it; :meth:`Technique.from_page` turns the checked values into
  options;
- :meth:`Technique.argv`: the command line its options stand for (the web page shows exactly that);
- :meth:`Technique.evals`: the network evaluations it costs (the web page's limit, its progress bar);
- :meth:`Technique.run`: the :class:`~difflo.edit.techniques.EditResult`.

**Options** are an ``argparse.Namespace`` with one attribute per flag (its ``dest``), holding what
``difflo edit``'s parser holds: classes as given (an index or a name, as text), lists as text
(``"1,3,5"``), file names as given. :meth:`Technique.run` reads them into the typed arguments of
:mod:`difflo.edit.techniques`'s functions (classes through ``Model.class_index``, with the flag's name in
errors), so a bad value is one line naming its flag, from either front end.

**The command line** gives each flag whose value differs from its default (the shortest command that
parses back to the same options; ``tests/unit/test_edit_registry.py`` checks the round trip): first the
shared options, then the technique's inputs (files and classes), its time grid, and its other flags.

Layers: this module is the library; the argparse validators belong to the front end
(:mod:`difflo.cli.argtypes`), so a flag names its validator (``type="positive_int"``) and ``cli/edit.py``
looks it up there. The request checks (types, bounds, uploads) are the web page's
(:mod:`difflo.serve.app`); a field only states them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import parse_interval
from ..errors import DiffloError
from ..generate import check_steps
from ..images import load_image, load_mask, parse_colour
from ..model import Model
from ..precision import PRECISIONS
from ..samplers import SAMPLERS
from . import techniques
from .operators import VIEWS
from .techniques import EditOptions, EditResult


# ----------------------------------------------------------------------------- flags and fields
@dataclass(frozen=True)
class Flag:
    """One argument of ``difflo edit NAME``: ``argparse.add_argument(name, **kwargs)``.

    ``type`` is a callable, or the name of a validator in :mod:`difflo.cli.argtypes` (the front end's);
    ``kind`` is "class" (an index or a name, read through ``Model.class_index``), "file" (an input
    file) or "value"; classes and files are the technique's inputs, shown first in its command."""
    name: str
    help: str | None = None
    default: Any = None
    type: Callable | str | None = None
    choices: tuple | None = None
    required: bool = False
    action: str | None = None                 # "store_true" / "store_false"
    dest: str | None = None                   # default: from the name (--jump-length -> jump_length)
    kind: str = "value"

    @property
    def key(self) -> str:
        """The option's name (argparse's dest)."""
        return self.dest or self.name.lstrip("-").replace("-", "_")

    def kwargs(self) -> dict:
        """``add_argument``'s keywords (``type`` as given: a callable or a validator's name)."""
        kw = {"dest": self.dest, "type": self.type, "choices": None if self.choices is None else list(self.choices),
              "action": self.action, "help": self.help}
        kw = {k: v for k, v in kw.items() if v is not None}
        if self.required:
            kw["required"] = True
        if self.default is not None and self.action != "store_true":
            kw["default"] = self.default
        return kw

    def argv(self, value) -> list[str]:
        """The flag and its value as command-line text; nothing at the default."""
        if self.action == "store_true":
            return [self.name] if value else []
        if self.action == "store_false":
            return [] if value else [self.name]
        if value is None or value == self.default:
            return []
        return [self.name, flag_text(value)]


@dataclass(frozen=True)
class OneOf:
    """Mutually exclusive flags (``add_mutually_exclusive_group(required=...)``)."""
    flags: tuple[Flag, ...]
    required: bool = False


@dataclass(frozen=True)
class Field:
    """One field the web page sends for a technique (JSON name), and how the page checks it.

    ``kind``: "int" / "float" (from ``lo`` to ``hi``; ``odd`` ints only), "choice" (one of ``choices``),
    "class" (an index into the model's classes), "image" / "mask" (an upload, written into the job as
    ``file``, the name the command line gives). ``dest`` is the option it sets (default: its name)."""
    name: str
    kind: str
    lo: float | None = None
    hi: float | None = None
    default: Any = None
    choices: tuple = ()
    odd: bool = False
    file: str | None = None
    dest: str | None = None

    @property
    def key(self) -> str:
        return self.dest or self.name

    def to_json(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "min": self.lo, "max": self.hi, "default": self.default,
               "choices": list(self.choices) or None, "odd": self.odd or None}
        return {k: v for k, v in out.items() if v is not None}


def flag_text(value) -> str:
    """A value as command-line text: floats as the shortest text that parses back to the same float
    (3.0 -> 3, 0.1 -> 0.1)."""
    if isinstance(value, float):
        s = repr(value)
        return s[:-2] if s.endswith(".0") else s
    return str(value)


def int_list(s: str, flag: str) -> list[int]:
    """Comma-separated integers (``1,3,5``); a bad one is a one-line error naming the flag."""
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise DiffloError(f"{flag} must be comma-separated integers like 1,3,5; got {s!r}") from None


def _members(items) -> list[Flag]:
    return [f for item in items for f in (item.flags if isinstance(item, OneOf) else (item,))]


# The shared flags, in the order every technique shows them.
TRIES = (Flag("--seed", "try i uses seed + i (default 0)", 0, "seed"),
         Flag("--n", "number of tries (default 1)", 1, "positive_int"))
MODEL_FLAGS = (Flag("--device", default="cpu"),
               Flag("--precision", "the network's precision (default: the run's sample.precision, auto)",
                    choices=tuple(PRECISIONS)),
               Flag("--no-ema", "use the raw weights", True, action="store_false", dest="ema"))
SAMPLER = Flag("--sampler", "default ddpm for diffusion, euler for flow", choices=tuple(SAMPLERS))
NO_CLIP = Flag("--no-clip", "do not clamp the predicted x0 to [-1, 1]", False, action="store_true")
GUIDANCE = (Flag("--guidance-interval", "LO,HI: guide only where sigma/alpha lies in [LO, HI], w = 1 elsewhere "
                                        "(Kynkaanniemi et al. 2024; default: everywhere)"),
            Flag("--guidance-rescale", "rescaled guidance phi in [0, 1] (Lin et al. 2024; default 0: off)", 0.0,
                 "nonneg_float"))
STEPS_OR_STRIDE = OneOf((Flag("--steps", "sampling steps (default 50)", 50, "positive_int"),
                         Flag("--stride", "instead of --steps: timesteps T' , T'-S, ..., 0", type="positive_int")))
STRIDE = Flag("--stride", "timestep stride: 990, 960, ..., 0 for 30 (default 30)", 30, "positive_int")

# Page fields shared by techniques (JSON name -> option); the limits are the web page's.
IMAGE = Field("image", "image", file="input.png")
MASK = Field("mask", "mask", file="mask.png")
CLASS = Field("class", "class", default=0, dest="cls")
PAGE_VIEWS = tuple(v for v in VIEWS if v != "identity")      # identity would read as one class both ways


# ----------------------------------------------------------------------------- the base class
class Technique:
    """One editing technique as both front ends see it (see the module docstring). Subclasses set the
    class attributes and write :meth:`edit` (and :meth:`evals`; :meth:`from_page` where the page's fields
    are not the options themselves)."""
    name: str = ""
    help: str = ""
    flags: tuple = ()                  # its own flags (Flag / OneOf), in help order
    tries: bool = True                 # --seed and --n: try i uses seed + i
    w: float | None = 3.0              # --w's default; None: no guidance flags (--w, --sampler, --no-clip)
    ode: bool = False                  # no --sampler: the ODE sampler DDIM inversion inverts
    times: tuple = (STEPS_OR_STRIDE,)  # the time-grid flags
    page: tuple[Field, ...] | None = None   # the web page's fields; None: not on the page

    # ------------------------------------------------------------------ flags and options
    def shared_flags(self) -> tuple:
        """The flags its attributes ask for: tries, the model's options, guidance."""
        out = [*(TRIES if self.tries else ()), *MODEL_FLAGS]
        if self.w is not None:
            out += [Flag("--w", f"CFG scale in each branch (default {self.w:g})", self.w, "nonneg_float"),
                    *(() if self.ode else (SAMPLER,)), NO_CLIP, *GUIDANCE]
        return tuple(out)

    def all_flags(self) -> tuple:
        """Every flag of ``difflo edit NAME`` after --ckpt/--null-class/--out/--figure, in help order."""
        return (*self.shared_flags(), *self.times, *self.flags)

    def defaults(self) -> dict:
        return {f.key: f.default for f in _members(self.all_flags())}

    def options(self, **values) -> argparse.Namespace:
        """Options at the defaults, with ``values`` (by option name) in their place."""
        defaults = self.defaults()
        unknown = sorted(set(values) - set(defaults))
        if unknown:                                                       # a bug, not a user's input
            raise TypeError(f"edit {self.name} has no option {', '.join(unknown)}")
        return argparse.Namespace(**{**defaults, **values})

    def argv(self, options) -> list[str]:
        """The arguments after ``difflo edit NAME --ckpt CKPT`` that give ``options``: the shared options,
        the inputs (files and classes), the time grid, the technique's other flags."""
        def is_input(item):
            return any(f.kind != "value" for f in _members([item]))
        order = [*self.shared_flags(), *(i for i in self.flags if is_input(i)), *self.times,
                 *(i for i in self.flags if not is_input(i))]
        return [a for f in _members(order) for a in f.argv(getattr(options, f.key))]

    def from_page(self, model: Model, values: dict, notes: list) -> dict:
        """Options from the web page's checked values (the shared ones by option name, the technique's by
        field name: a class as its index, an upload as its file name)."""
        fields = {f.name: f for f in self.page or ()}
        keys = self.defaults()
        out = {}
        for name, v in values.items():
            f = fields.get(name)
            key = f.key if f else name
            if key in keys:
                out[key] = str(v) if f is not None and f.kind == "class" else v
        return out

    # ------------------------------------------------------------------ running
    def run(self, model: Model, options) -> EditResult:
        """The technique on a loaded model; ``options`` as ``difflo edit`` parses them (left unchanged)."""
        o = argparse.Namespace(**vars(options))
        for f in _members(self.all_flags()):
            if f.kind == "class" and getattr(o, f.key, None) is not None:     # names or indices -> indices
                setattr(o, f.key, model.class_index(getattr(o, f.key), f.name))
        return self.edit(model, o, [])

    def edit(self, model: Model, o, notes: list) -> EditResult:
        raise NotImplementedError

    def evals(self, model: Model, options) -> int:
        """Network evaluations (calls of the network; a guided batch is one) that ``run`` costs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ pieces the techniques share
    @staticmethod
    def seeds(o) -> list[int]:
        return [getattr(o, "seed", 0) + i for i in range(getattr(o, "n", 1))]

    @staticmethod
    def precision(model: Model, o) -> str:
        return o.precision or model.cfg.sample.precision

    def sampler(self, model: Model, o) -> str:
        if getattr(o, "sampler", None):
            return o.sampler
        return techniques.ode_sampler(model) if self.ode else techniques.default_sampler(model)

    def edit_options(self, model: Model, o) -> EditOptions:
        try:
            interval = parse_interval(o.guidance_interval) if o.guidance_interval else ()
        except ValueError as e:
            raise DiffloError(f"--guidance-interval: {e}") from None
        return EditOptions(self.seeds(o), self.sampler(model, o), o.w, not o.no_clip, self.precision(model, o),
                           interval, o.guidance_rescale).check(model)

    @staticmethod
    def load(model: Model, path, notes: list) -> torch.Tensor:
        """An image file as the model sees it (its channels and size, transparency over data.background)."""
        return load_image(path, model.cfg.model.in_channels, model.cfg.model.image_size, notes,
                          background=parse_colour(model.cfg.data.background)).to(model.device)

    def image(self, model: Model, o, c, notes: list) -> torch.Tensor:
        """The --image file, or a model sample of class c."""
        if o.image:
            return self.load(model, o.image, notes)
        return techniques.sample_input(model, c, o.seed, notes, self.precision(model, o)).to(model.device)

    @staticmethod
    def grid(model: Model, o) -> list:
        return techniques.time_grid(model, steps=o.steps, stride=o.stride)

    def per_step(self, model: Model, o) -> int:
        """The sampler's evaluations per step (for Heun one more than it makes on a grid that ends at the
        clean data, whose last step is an Euler step: the web page's bound, as it always counted)."""
        return SAMPLERS[self.sampler(model, o)].evals_per_step

    @staticmethod
    def input_evals(o) -> int:
        """A generated input image (no --image): its sampling."""
        return 0 if o.image else SAMPLERS[techniques.INPUT_SAMPLER].evals(techniques.INPUT_STEPS)


# ----------------------------------------------------------------------------- the techniques
class Forward(Technique):
    name = "forward"
    help = "the forward process at chosen timesteps, as a strip"
    w, times = None, ()
    flags = (Flag("--image", "input PNG/JPG (default: a model sample of --class)", kind="file"),
             Flag("--class", "class (index or name) of the generated input (no --image)", "0", dest="cls",
                  kind="class"),
             Flag("--t", "comma-separated timesteps (default 250,500,750)", "250,500,750"))

    def edit(self, model, o, notes):
        values = []
        if o.t:
            try:
                values = [float(v) for v in o.t.split(",") if v.strip()]
            except ValueError:
                raise DiffloError(f"--t must be comma-separated timesteps like 250,500,750; got {o.t!r}") from None
        ts = techniques.cli_times(model, values)
        if not ts:
            raise DiffloError("--t needs at least one timestep, e.g. 250,500,750")
        return techniques.forward(model, self.image(model, o, o.cls, notes), ts, self.seeds(o), notes)

    def evals(self, model, o):
        return self.input_evals(o)


class Denoise(Technique):
    name = "denoise"
    help = "blur vs one-step vs iterative denoising of a noisy image, with PSNR"
    w, times = 0.0, (STRIDE,)
    flags = (Flag("--image", "clean input PNG/JPG (default: a model sample of --class)", kind="file"),
             Flag("--class", "class of the generated input, and the condition when --w > 0 (default w 0: "
                             "unconditional)", dest="cls", kind="class"),
             Flag("--i-start", "index into the strided timesteps of the noise level (default 10: t=690 for "
                               "stride 30)", 10, int))

    def edit(self, model, o, notes):
        opts = self.edit_options(model, o)
        if o.w > 0 and o.cls is None and model.num_classes:
            raise DiffloError("--w > 0 conditions on a class: give --class")
        return techniques.denoise(model, opts, self.image(model, o, o.cls, notes), 0 if o.cls is None else o.cls,
                                  o.stride, o.i_start, notes)

    def evals(self, model, o):
        n = len(techniques.time_grid(model, stride=o.stride)) - 1
        return self.input_evals(o) + 1 + (n - o.i_start) * self.per_step(model, o)    # one-step, iterative


class SDEdit(Technique):
    name = "sdedit"
    help = "image-to-image: noise an image to several levels and denoise toward a class"
    times = (STRIDE,)
    flags = (Flag("--image", "input PNG/JPG (hand-drawn or out of domain is fine)", required=True, kind="file"),
             Flag("--class", "target class (index or name)", required=True, dest="cls", kind="class"),
             Flag("--levels", "start levels: the number of strided steps from the clean end (default "
                              "1,3,5,7,10,20)", "1,3,5,7,10,20"))
    page = (IMAGE, CLASS, Field("strength", "float", 0.01, 1.0, 0.5))

    def edit(self, model, o, notes):
        opts = self.edit_options(model, o)
        levels = int_list(o.levels, "--levels")
        return techniques.sdedit(model, opts, self.image(model, o, None, notes), o.cls, o.stride, levels, notes)

    def evals(self, model, o):
        return sum(int_list(o.levels, "--levels")) * self.per_step(model, o)       # level k: k steps

    def from_page(self, model, values, notes):
        """The page's strength (0..1] and steps: the stride that gives about ``steps`` steps, and the level
        that starts ``strength`` of the way to pure noise."""
        path = model.path
        stride = max(1, path.cli_scale // values["steps"])
        n_ts = len(path.strided_times(stride)) - 1
        level = max(1, round(values["strength"] * n_ts))
        notes.append(f"strength {values['strength']:g}: start {level} of {n_ts} steps (stride {stride}) from the "
                     f"clean end")
        return {**super().from_page(model, values, notes), "stride": stride, "levels": str(level)}


class Inpaint(Technique):
    name = "inpaint"
    help = "RePaint: regenerate the white region of a mask"
    flags = (Flag("--image", required=True, kind="file"),
             Flag("--mask", "mask PNG of the image's size: white (>=128) = regenerate", required=True, kind="file"),
             Flag("--class", "class (index or name) to fill in with", required=True, dest="cls", kind="class"),
             Flag("--jump-length", "RePaint jump length j (default 1)", 1, "positive_int"),
             Flag("--jump-n-sample", "RePaint resampling: run each chunk of j steps r times (default 1: no jumps)",
                  1, "positive_int"))
    page = (IMAGE, CLASS, MASK, Field("jump_length", "int", 1, 50, 1), Field("jump_n_sample", "int", 1, 10, 1))

    def edit(self, model, o, notes):
        opts = self.edit_options(model, o)
        x = self.image(model, o, None, notes)
        mask = load_mask(o.mask, o.image, model.cfg.model.image_size).to(x.device)
        return techniques.inpaint(model, opts, x, mask, o.cls, self.grid(model, o), o.jump_length, o.jump_n_sample,
                                  notes)

    def evals(self, model, o):
        return (len(self.grid(model, o)) - 1) * o.jump_n_sample * self.per_step(model, o)   # each step r times


class Anagram(Technique):
    name = "anagram"
    help = "an image that reads as class A upright and class B in another view"
    flags = (Flag("--a", "class seen upright (index or name)", required=True, kind="class"),
             Flag("--b", "class seen in --view (index or name)", required=True, kind="class"),
             Flag("--view", "default rot180", "rot180", choices=tuple(VIEWS)))
    page = (Field("view", "choice", default="rot180", choices=PAGE_VIEWS), Field("a", "class", default=0),
            Field("b", "class", default=0))

    def edit(self, model, o, notes):
        return techniques.anagram(model, self.edit_options(model, o), o.a, o.b, o.view, self.grid(model, o))

    def evals(self, model, o):
        return (len(self.grid(model, o)) - 1) * self.per_step(model, o)


class Hybrid(Technique):
    name = "hybrid"
    help = "low frequencies from class A, high frequencies from class B"
    flags = (Flag("--low", "class A (low frequencies, seen from afar; index or name)", required=True, kind="class"),
             Flag("--high", "class B (high frequencies, seen close up; index or name)", required=True, kind="class"),
             Flag("--kernel-size", "Gaussian kernel size, odd (default 13)", 13, "positive_int"),
             Flag("--sigma", "Gaussian sigma in pixels (default 2)", 2.0, "nonneg_float"))
    page = (Field("kernel_size", "int", 1, 63, 9, odd=True), Field("sigma", "float", 0.0, 20.0, 1.5),
            Field("low", "class", default=0), Field("high", "class", default=0))

    def edit(self, model, o, notes):
        return techniques.hybrid(model, self.edit_options(model, o), o.low, o.high, o.kernel_size, o.sigma,
                                 self.grid(model, o))

    def evals(self, model, o):
        return (len(self.grid(model, o)) - 1) * self.per_step(model, o)


class Invert(Technique):
    name = "invert"
    help = "DDIM inversion: an image to its noise and back, with the PSNR per step count"
    tries, w, ode, times = False, 1.0, True, ()
    flags = (Flag("--image", "input PNG/JPG", required=True, kind="file"),
             Flag("--class", "class (index or name) to invert and sample back with", required=True, dest="cls",
                  kind="class"),
             Flag("--steps", "comma-separated step counts, one inversion each (e.g. 10,20,50; default 50)", "50"),
             Flag("--seed", "seed of the random-noise baseline (default 0)", 0, "seed"))

    def edit(self, model, o, notes):
        opts = self.edit_options(model, o)
        return techniques.invert(model, opts, self.image(model, o, None, notes), o.cls, int_list(o.steps, "--steps"),
                                 notes)

    def evals(self, model, o):
        steps = dict.fromkeys(check_steps(n, model) for n in int_list(o.steps, "--steps"))
        ws = 2 if o.w != 1.0 and model.num_classes else 1               # the w = 1 round trip too
        per = self.per_step(model, o)
        return sum(n * (ws * (1 + per) + per) for n in steps)            # inversion, back; the random baseline


def _end(side: str) -> OneOf:
    """An end of an interpolation: an image or a seed."""
    return OneOf((Flag(f"--image-{side}", f"end {side.upper()}: an image PNG/JPG, DDIM-inverted to its noise",
                       kind="file"),
                  Flag(f"--seed-{side}", f"end {side.upper()}: this seed's noise (as difflo sample --seed)",
                       type="seed")), required=True)


class Interpolate(Technique):
    name = "interpolate"
    help = "frames between two noises (slerp) and two classes (embedding mix)"
    tries, w, ode, times = False, 1.0, True, ()
    flags = (_end("a"), _end("b"),
             Flag("--class-a", "class (index or name) at end A (default: --class-b; neither: unconditional)",
                  kind="class"),
             Flag("--class-b", "class at end B (default: --class-a); the embedding is mixed linearly between",
                  kind="class"),
             Flag("--frames", "number of frames, ends included (default 8)", 8, "positive_int"),
             Flag("--steps", "DDIM (flow: Euler) steps (default 50)", 50, "positive_int"))

    def edit(self, model, o, notes):
        opts = self.edit_options(model, o)
        ends = [self.load(model, img, notes) if img is not None else s
                for img, s in ((o.image_a, o.seed_a), (o.image_b, o.seed_b))]
        return techniques.interpolate(model, opts, ends[0], ends[1], o.class_a, o.class_b, o.frames,
                                      techniques.time_grid(model, steps=o.steps), notes)

    def evals(self, model, o):
        n = len(techniques.time_grid(model, steps=o.steps)) - 1
        images = sum(img is not None for img in (o.image_a, o.image_b))     # each inverted over the grid
        return n * images + n * self.per_step(model, o)                     # the frames: one batch


# Adding a technique: a subclass above, and its entry here (a case in tests/unit/test_edit_registry.py too).
TECHNIQUES: dict[str, Technique] = {t.name: t for t in (Forward(), Denoise(), SDEdit(), Inpaint(), Anagram(),
                                                         Hybrid(), Invert(), Interpolate())}
