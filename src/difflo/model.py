"""The model factory: a network rebuilt from its checkpoint alone, the device, the denoiser.

:class:`Model` is a network with the resolved config it was trained with; its ``path`` (see
:mod:`difflo.noise_paths`) carries everything that depends on the objective. :func:`make_denoiser` turns
it into the one denoiser interface the samplers consume (x0 prediction, guided, optionally clamped).

The network is any module called as ``net(x, time, y) -> output`` (:class:`difflo.nn.UNet`'s call):
difflo's UNet, or a diffusers UNet2DModel behind :class:`difflo.pretrained.DiffusersUNet` when
``--ckpt`` names a diffusers model folder (:func:`load_model`).
"""
from __future__ import annotations

import difflib
import functools
import sys
from dataclasses import dataclass

import torch

from . import config as config_mod, precision as precision_mod, pretrained
from .checkpoint import is_diffusers_folder, load_weights, resolve_weights, verify_file
from .data.idx import FASHION_CLASSES
from .errors import CheckpointError, DiffloError
from .guidance import (AutoguidanceDenoiser, CFGDenoiser, ClampDenoiser, GuidanceInput, IntervalDenoiser,
                       ModelDenoiser)
from .nn import UNet
from .noise_paths import NoisePath, make_path


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffloError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DiffloError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DiffloError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise DiffloError(f"device {name!r} asked for, but this PyTorch has no MPS support; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DiffloError(f"device {name!r} cannot run difflo; use auto, cpu, cuda or cuda:N")
    return device


KNOWN_NAMES = {"fashion-mnist": FASHION_CLASSES}   # for checkpoints written before data.classes was stored


@dataclass
class Model:
    """A network with the resolved config it was trained with. ``net`` is called as
    ``net(x, time, y)``: difflo's UNet, or a foreign network wrapped to that call (difflo.pretrained)."""
    net: torch.nn.Module
    cfg: config_mod.Config

    @functools.cached_property
    def path(self) -> NoisePath:
        return make_path(self.cfg.diffusion)

    @property
    def objective(self) -> str:
        return self.cfg.diffusion.objective

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes

    @property
    def has_null_class(self) -> bool:
        """Whether the network knows the null class that guidance asks for (index ``num_classes``):
        always for difflo's own models; for a class-conditional diffusers model once it is named
        (:meth:`set_null_class`)."""
        foreign = pretrained.foreign_net(self.net)
        return foreign is None or not foreign.conditional or foreign.null_class is not None

    def set_null_class(self, k: int) -> None:
        """``--null-class K``: the class index a diffusers model reads as "no class". A difflo-trained
        model's own null class is ``num_classes`` (the only value accepted for it)."""
        foreign = pretrained.foreign_net(self.net)
        if foreign is not None:
            self.cfg.model.num_classes = foreign.set_null_class(int(k))
        elif self.num_classes == 0:
            raise DiffloError("--null-class: this model is unconditional (no class labels), so there is no null "
                              "class to name")
        elif k != self.num_classes:
            raise DiffloError(f"--null-class {k}: a difflo-trained model's null class is its index num_classes = "
                              f"{self.num_classes}; --null-class is for diffusers models")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def class_names(self) -> tuple[str, ...]:
        """One name per class: the data set's names stored with the model (``data.classes``), else
        the indices as text (models trained before names were stored, data sets without names)."""
        names = tuple(self.cfg.data.classes) or KNOWN_NAMES.get(self.cfg.data.name, ())
        return names if len(names) == self.num_classes else tuple(str(c) for c in range(self.num_classes))

    def class_label(self, c: int) -> str:
        """A grid row's label: the class's name, or "class c" where the model has no names."""
        name = self.class_names[c]
        return name if name != str(c) else f"class {c}"

    def class_index(self, token, flag: str = "--class") -> int:
        """A class given by index (7, "7") or by name ("plant-flower"; case-insensitive): its index."""
        k = self.num_classes
        if k == 0:
            return 0
        text = str(token).strip()
        if text.lstrip("-").isdigit():
            c = int(text)
            if not 0 <= c < k:
                raise DiffloError(f"class index {c} out of range in {flag}: this model has classes 0..{k - 1}")
            return c
        names = self.class_names
        folded = [n.casefold() for n in names]
        if text.casefold() in folded:
            return folded.index(text.casefold())
        close = difflib.get_close_matches(text, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            f"; this model's classes are {', '.join(names[:8])}{', ...' if k > 8 else ''} (or indices 0..{k - 1})"
        raise DiffloError(f"no class {text!r} in {flag}{hint}")

    def parse_classes(self, spec: str, flag: str = "--classes") -> list[int]:
        """'all', or comma-separated indices and/or names, as class indices ([0] for an unconditional model,
        with a note when ``spec`` names classes)."""
        if self.num_classes == 0:
            if spec.strip() != "all":
                note_once(f"note: this model is unconditional (no class labels): {flag} {spec} is ignored")
            return [0]
        if spec.strip() == "all":
            return list(range(self.num_classes))
        classes = [self.class_index(c, flag) for c in spec.split(",") if c.strip() != ""]
        if not classes:
            raise DiffloError(f"{flag} must be 'all' or comma-separated class indices or names; got {spec!r}")
        return classes

    def precision(self, asked: str) -> precision_mod.Precision:
        """The precision that runs for ``asked`` on this model's device (a warning printed once to stderr)."""
        return precision_mod.resolve(asked, self.device, log=note_once)


_noted: set[str] = set()


def note_once(message: str) -> None:
    """Print a note or warning line to stderr once per process (a model sampled batch after batch, or
    one setting checked by several front ends, says it once)."""
    if message not in _noted:
        _noted.add(message)
        print(message, file=sys.stderr)


def build_net(cfg: config_mod.Config) -> UNet:
    try:
        return UNet(cfg.model)
    except (RuntimeError, MemoryError, OverflowError, TypeError) as e:     # an allocation too large to make
        m = cfg.model
        raise DiffloError(f"cannot build the UNet (model.channels={m.channels}, channel_mult={list(m.channel_mult)}, "
                          f"in_channels={m.in_channels}): {str(e).splitlines()[0][:120]}; choose a smaller "
                          f"model") from None


def load_model(path, ema: bool = True, device="cpu", null_class: int | None = None) -> Model:
    """Rebuild the network from a ``--ckpt`` alone: a run directory, its ``checkpoints/`` folder, a
    checkpoint directory, a difflo ``.safetensors`` file, ``demo`` (see
    :func:`difflo.checkpoint.resolve_weights`) or a diffusers model folder (:mod:`difflo.pretrained`;
    it has one set of weights, so ``ema`` does not apply). ``null_class``: ``--null-class K``
    (:meth:`Model.set_null_class`), which overrides the null class a folder names itself."""
    weights = resolve_weights(path, ema)
    net, cfg = pretrained.load_folder(weights) if is_diffusers_folder(weights) else load_difflo_net(weights)
    model = Model(net.to(device).eval(), cfg)
    if null_class is not None:
        model.set_null_class(null_class)
    return model


def load_guide(path, model: Model, ema: bool = True, device="cpu") -> Model | None:
    """``--guide CKPT`` (any ``--ckpt`` form): the autoguidance guide of ``model``, checked to be of the same
    kind (:func:`check_guide`); None where ``path`` is None. It is evaluated with the model's condition,
    never with a null class, so it takes no ``--null-class``."""
    if path is None:
        return None
    try:
        guide = load_model(path, ema=ema, device=device)
    except DiffloError as e:
        raise type(e)(f"--guide: {e}") from None
    return check_guide(model, guide)


def load_difflo_net(weights) -> tuple[UNet, config_mod.Config]:
    """difflo's UNet and its config from a difflo weights file (its checksum checked when it has one)."""
    verify_file(weights)                      # a checkpoint directory's checksum, when it has a manifest
    state, cfg_dict, _ = load_weights(weights)
    try:
        cfg = config_mod.from_dict(cfg_dict)
        cfg.validate()
        net = build_net(cfg)
    except (DiffloError, ValueError) as e:
        raise CheckpointError(f"{weights}: its stored config does not build a model ({e})") from None
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{weights} does not fit the architecture in its own config "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped "
                              f"tensors, e.g. {(missing + unexpected + wrong)[0]})")
    net.load_state_dict(state)
    return net, cfg


def make_denoiser(model: Model, w: float, clip_x0: bool = True, autocast: torch.dtype | None = None,
                  dtype: torch.dtype = torch.float32, interval: tuple[float, ...] = (), rescale: float = 0.0,
                  guide: Model | None = None):
    """The network as a denoiser (x0 prediction), guided with scale w, optionally clamped to
    [-diffusion.clip_range, clip_range]; the network runs under autocast to ``autocast`` (None: float32;
    see difflo.precision) and x0_hat comes in ``dtype``. It takes one time or per-sample times and leaves
    autograd on (callers that need no gradients run it under ``torch.no_grad()``; see
    :mod:`difflo.guidance`). An unconditional model ignores w (a note says so when w would guide).

    Guidance is classifier-free, or autoguidance where a ``guide`` model is given (its conditional
    prediction in place of the unconditional one; it needs no null class and guides unconditional models
    too; :func:`check_guide`); ``rescale`` (phi) rescales either (Lin et al. 2024), and ``interval`` = (lo, hi)
    guides only where sigma/alpha lies in [lo, hi] (Kynkaanniemi et al. 2024), the conditional denoiser
    elsewhere. The defaults (no interval, rescale 0, no guide) are the plain CFG wrapper itself."""
    distilled = model.cfg.distill
    if model.cfg.model.guidance_input:                 # a student that takes w as an input: one call, w goes in
        return student_denoiser(model, w, clip_x0, autocast, dtype, interval, rescale, guide)
    if distilled.method is not None and w != 1.0:
        raise DiffloError(f"w={w:g}: this {distilled.method} student has guidance w={distilled.w:g} distilled in "
                          f"(its null class is not trained), so it samples with w 1; for another w distil a student "
                          f"that takes w as an input (difflo distill --w-range LO,HI)")
    den = ModelDenoiser(model.net, model.path, model.cfg.diffusion.prediction, autocast, dtype)
    guided = den
    if guide is not None:
        check_guide(model, guide)
        bad = ModelDenoiser(guide.net, guide.path, guide.cfg.diffusion.prediction, autocast, dtype)
        guided = AutoguidanceDenoiser(den, bad, w, rescale)
    elif model.num_classes > 0:
        if w != 1.0 and not model.has_null_class:
            raise DiffloError(pretrained.null_class_needed(w))
        guided = CFGDenoiser(den, w, null_class=model.num_classes, rescale=rescale)
    elif w not in (0.0, 1.0, model.cfg.sample.w):
        note_once(f"note: this model is unconditional (no class labels): guidance w={w:g} has no effect")
    if (interval or rescale) and (guided is den or w == 1.0):
        note_once("note: the guidance interval and rescale have no effect without guidance ("
                   + ("w = 1" if guided is not den else "an unconditional model without --guide") + ")")
    elif interval:
        guided = IntervalDenoiser(guided, den, *interval)
    r = model.cfg.diffusion.clip_range
    return ClampDenoiser(guided, -r, r) if clip_x0 else guided


def student_denoiser(model: Model, w: float, clip_x0: bool, autocast, dtype, interval, rescale, guide):
    """:func:`make_denoiser` for a student that takes w as an input (``model.guidance_input``): the guided prediction
    in one call. Guidance that needs two branches (interval, rescale, autoguidance) is refused in one line; a w
    outside the range it was distilled for is a note (the network extrapolates)."""
    if guide is not None or interval or rescale:
        given = [f for f, v in (("--guide", guide is not None), ("--guidance-interval", bool(interval)),
                                ("--guidance-rescale", bool(rescale))) if v]
        raise DiffloError(f"{', '.join(given)}: this student takes w as an input and makes the guided prediction in "
                          f"one call; there are no two branches to {'combine' if guide is not None else 'limit or rescale'}"
                          f" (sample its teacher for that)")
    lo, hi = model.cfg.distill.w_range
    if not lo <= w <= hi:
        note_once(f"note: w={w:g} is outside the range [{lo:g}, {hi:g}] this student was distilled for; it "
                  f"extrapolates")
    den = ModelDenoiser(GuidanceInput(model.net, float(w)), model.path, model.cfg.diffusion.prediction, autocast, dtype)
    r = model.cfg.diffusion.clip_range
    return ClampDenoiser(den, -r, r) if clip_x0 else den


def check_guide(model: Model, guide: Model) -> Model:
    """The autoguidance guide (``--guide``) must be a model of the same kind: the same objective and noise path
    (the same alpha_t, sigma_t at every time the model samples; the prediction may differ), image shape and
    classes. Else a one-line DiffloError naming the difference; returns the guide."""
    def kind(m: Model) -> str:
        return f"{m.objective} objective, {type(m.path).__name__}, max steps {m.path.max_steps}"
    if kind(guide) != kind(model):
        raise DiffloError(f"--guide: the guide has {kind(guide)}; the model has {kind(model)} (autoguidance needs "
                          f"a model of the same kind, e.g. an earlier checkpoint of the same run)")
    times = torch.tensor(model.path.sampling_times(model.path.max_steps or 100, model.path.spacings[0]),
                         dtype=torch.float64)
    if not all(torch.allclose(a, b, rtol=1e-6, atol=1e-9)
               for a, b in zip(model.path.alpha_sigma(times), guide.path.alpha_sigma(times))):
        raise DiffloError("--guide: the guide's noise schedule differs from the model's (autoguidance evaluates both "
                          "at the same times); use a checkpoint trained with the same diffusion settings")
    shape = [(m.cfg.model.in_channels, m.cfg.model.image_size) for m in (model, guide)]
    if shape[0] != shape[1]:
        raise DiffloError(f"--guide: the guide makes {shape[1][0]}-channel {shape[1][1]}px images; the model "
                          f"{shape[0][0]}-channel {shape[0][1]}px")
    if guide.num_classes != model.num_classes or (guide.class_names and model.class_names
                                                  and list(guide.class_names) != list(model.class_names)):
        raise DiffloError(f"--guide: the guide has {guide.num_classes} classes, the model {model.num_classes} "
                          f"(or other class names); autoguidance conditions both on the same class")
    return guide
