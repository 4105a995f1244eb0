"""Generating images from a trained model: checkpoint -> denoiser -> sampler, in batches.

``generate`` draws sample i from its own generator seeded with ``seeds[i]``, so an image depends
on its seed (and label and settings) only, never on the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import config as config_mod
from .checkpoint import load_weights, resolve_weights, verify_file
from .diffusion import DiscreteSchedule
from .flow import FlowPath
from .errors import CheckpointError, DiffloError
from .guidance import CFGDenoiser, ClampDenoiser, ModelDenoiser
from .nn import UNet
from .samplers import SAMPLERS, SAMPLERS_FOR, SeededNoise


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


@dataclass
class Model:
    """A network with the resolved config it was trained with."""
    net: UNet
    cfg: config_mod.Config

    @property
    def path(self) -> DiscreteSchedule | FlowPath:
        return make_path(self.cfg.diffusion)

    @property
    def objective(self) -> str:
        return self.cfg.diffusion.objective

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes


def build_net(cfg: config_mod.Config) -> UNet:
    try:
        return UNet(cfg.model)
    except (RuntimeError, MemoryError, OverflowError, TypeError) as e:     # an allocation too large to make
        m = cfg.model
        raise DiffloError(f"cannot build the UNet (model.channels={m.channels}, channel_mult={list(m.channel_mult)}, "
                          f"in_channels={m.in_channels}): {str(e).splitlines()[0][:120]}; choose a smaller "
                          f"model") from None


def make_path(d: config_mod.DiffusionConfig) -> DiscreteSchedule | FlowPath:
    """The noising path of an objective: DDPM's discrete schedule, or the straight flow path."""
    return FlowPath() if d.objective == "flow" else DiscreteSchedule.from_name(d.schedule, d.timesteps)


def load_model(path, ema: bool = True, device="cpu") -> Model:
    """Rebuild the network from a run directory, checkpoint directory or weights file alone."""
    weights = resolve_weights(path, ema)
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
    return Model(net.to(device).eval(), cfg)


def make_denoiser(model: Model, w: float, clip_x0: bool = True):
    """The network as a denoiser (x0 prediction), guided with scale w, optionally clamped."""
    den = ModelDenoiser(model.net, model.path, model.cfg.diffusion.prediction)
    if model.num_classes > 0:
        den = CFGDenoiser(den, w, null_class=model.num_classes)
    return ClampDenoiser(den) if clip_x0 else den


def generate(model: Model, labels: torch.Tensor, seeds, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
             w: float = 3.0, spacing: str = "trailing", clip_x0: bool = True, variance: str = "fixed_small",
             batch_size: int = 250, callback=None, progress=None) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] for the given labels and per-image seeds.

    ``callback`` receives the sampler's per-step dict plus ``"batch"`` (the batch index)."""
    fits = SAMPLERS_FOR[model.objective]
    if sampler not in fits:
        raise DiffloError(f"sampler {sampler!r} does not fit this {model.objective} model; choose one of "
                          f"{', '.join(fits)}")
    if steps < 1:
        raise DiffloError(f"--steps must be >= 1, got {steps}")
    T = model.cfg.diffusion.timesteps
    if model.objective == "diffusion" and steps > T:
        raise DiffloError(f"--steps {steps} exceeds the model's {T} training timesteps")
    n_cls = model.num_classes
    if n_cls and (labels.min() < 0 or labels.max() >= n_cls):
        raise DiffloError(f"class index out of range: this model has classes 0..{n_cls - 1}")
    device = next(model.net.parameters()).device
    c, s = model.cfg.model.in_channels, model.cfg.model.image_size
    den = make_denoiser(model, w, clip_x0)
    path = model.path
    ts = path.sampling_times(steps, spacing) if model.objective == "diffusion" else path.sampling_times(steps)
    kwargs = {"eta": eta} if sampler == "ddim" else {"variance": variance} if sampler == "ddpm" else {}
    seeds = [int(x) for x in seeds]
    out = []
    for b, start in enumerate(range(0, len(seeds), batch_size)):
        noise = SeededNoise(seeds[start:start + batch_size], (c, s, s), device)
        x = noise()                                   # (B, C, H, W): x_T ~ N(0, I)
        y = labels[start:start + batch_size].to(device)
        cb = None if callback is None else (lambda d, b=b: callback({**d, "batch": b}))
        out.append(SAMPLERS[sampler](den, x, ts, extra_args={"y": y}, callback=cb, noise=noise, **kwargs).cpu())
        if progress is not None:
            progress.update(len(y))
    return torch.cat(out)
