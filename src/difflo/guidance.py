"""Denoisers: the one interface every sampler consumes, and the wrappers around it.

A *denoiser* is a callable ``denoiser(x, t, **extra_args) -> x0_hat`` with an attribute ``path``
(a :class:`~difflo.noise_paths.NoisePath`): given a noisy batch ``x = alpha_t x0 + sigma_t eps``
(B, C, H, W) at time ``t`` it returns the estimate of ``x0`` (k-diffusion and EDM call this "denoised").
``t`` is a Python number (one time for the whole batch: what the samplers pass) or a (B,) tensor (one
time per sample: what the likelihood estimators pass). Samplers derive ``eps_hat = (x - alpha_t x0_hat) /
sigma_t`` themselves. Because eps, x0 and v are affine in each other at fixed ``x`` and ``t``,
every wrapper below (guidance, clamping, and the editing wrappers) means the same thing whichever
parameterization the network was trained with.

**Gradients are the caller's business** (k-diffusion's convention): no denoiser here turns autograd off.
The samplers (:mod:`difflo.samplers`), the editing loops and :func:`difflo.generate.generate` run under
``torch.no_grad()``; the probability-flow likelihood (:mod:`difflo.eval.nll`) differentiates the same
denoiser in ``x``. The network preconditioning (prediction -> x0) is a wrapper around the raw network,
as EDM's ``EDMPrecond``.
"""
from __future__ import annotations

import math

import torch

from .diffusion import per_sample


class ModelDenoiser:
    """Wrap a network ``net(x, time, y) -> output`` trained with ``prediction`` on ``path``.

    ``autocast``: run the network under ``torch.autocast`` to this dtype (e.g. bfloat16; None: off);
    ``dtype``: the dtype of x0_hat, computed from the network's output and ``x`` converted to it (float32
    for sampling, float64 for the likelihood). The network itself gets ``x`` in float32 (as EDM's
    preconditioning casts it), scaled by the path (``network_input``: EDM's c_in), and the path turns its
    output into x0_hat (``x0_hat``: :func:`difflo.diffusion.to_x0`, or EDM's c_skip x + c_out F)."""

    def __init__(self, net: torch.nn.Module, path, prediction: str, autocast: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float32):
        self.net, self.path, self.prediction, self.autocast, self.dtype = net, path, prediction, autocast, dtype

    def __call__(self, x: torch.Tensor, t: int | float | torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) at time ``t`` (a Python number, or a (B,) tensor of per-sample times) -> x0_hat
        (B, C, H, W) in ``self.dtype``."""
        if isinstance(t, torch.Tensor) and t.ndim == 0:
            t = t.item()
        if isinstance(t, torch.Tensor):
            tt = t.to(x.device)                                           # (B,) per-sample times
            alpha, sigma = self.path.alpha_sigma(tt)                      # (B,) float64
        else:
            tt = torch.full((x.shape[0],), t, device=x.device)
            alpha, sigma = self.path.alpha_sigma(t)                       # Python floats
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.net(self.path.network_input(x.float(), alpha, sigma), self.path.model_time(tt), y)
        return self.path.x0_hat(out.to(self.dtype), x.to(self.dtype), alpha, sigma, self.prediction)


class GuidanceInput(torch.nn.Module):
    """A network that takes the guidance scale as an input (``model.guidance_input``: a student distilled with
    ``difflo distill --w-range``; Meng et al. 2023, "On Distillation of Guided Diffusion Models", Sec. 3.1), with
    its w fixed: ``net(x, time, y, class_weights)`` as every other network, so :class:`ModelDenoiser` and the
    editing wrappers call it unchanged. One network call per step gives the guided prediction. ``w``: a number,
    or a (B,) tensor (one scale per sample, as the distillation's targets draw them)."""

    def __init__(self, net: torch.nn.Module, w: float | torch.Tensor):
        super().__init__()
        self.net, self.w = net, w

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None,
                class_weights: torch.Tensor | None = None) -> torch.Tensor:
        w = self.w
        if isinstance(w, torch.Tensor) and w.ndim and w.shape[0] != x.shape[0]:   # a batch doubled by a wrapper
            w = w.repeat(x.shape[0] // w.shape[0])
        return self.net(x, time, y, class_weights=class_weights, w=w)


def noise_to_signal(path, t) -> float | torch.Tensor:
    """sigma_t / alpha_t of ``path`` at ``t`` (a float, or a (B,) float64 tensor for per-sample times); inf
    where alpha = 0 (the flow path's t = 1, a zero-terminal-SNR schedule's last step). On a variance-
    preserving path this is EDM's noise level sigma (Karras et al. 2022, x_t / alpha_t = x0 + sigma eps), and
    on the flow path the same quantity t / (1 - t): one noise level for every path."""
    alpha, sigma = path.alpha_sigma(t)
    if isinstance(alpha, torch.Tensor):
        return torch.where(alpha > 0, sigma / alpha.clamp_min(1e-300), torch.inf)
    return sigma / alpha if alpha > 0 else math.inf


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, w: float | torch.Tensor, rescale: float,
                     x: torch.Tensor, t, path) -> torch.Tensor:
    """``uncond + w (cond - uncond)`` on x0 predictions (w a number, or (B, 1, 1, 1): one per sample), then,
    for ``rescale`` = phi > 0, rescaled guidance
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4, Eq. 15-16):
    v_final = phi v_cfg std(v_cond) / std(v_cfg) + (1 - phi) v_cfg, the std over each sample's pixels.

    **On v, as in the paper** (whose model predicts v), with difflo's v = alpha eps - sigma x0 on any Gaussian
    path. With n = alpha^2 + sigma^2, v = (alpha x - n x0) / sigma, so v_final = k v_cfg with
    k = 1 - phi + phi std(alpha x - n x0_cond) / std(alpha x - n x0_cfg) (sigma cancels), and back in x0:
    x0 = k x0_cfg + (1 - k) alpha x / n. diffusers' ``rescale_noise_cfg`` rescales eps = (x - alpha x0) / sigma
    instead, which gives x0 = k' x0_cfg + (1 - k') x / alpha with k' from std(x - alpha x0_.): the two agree
    only where alpha = 1 (the offset alpha x / n vs x / alpha; on a VP path n = 1), and the eps form is
    undefined at alpha = 0, where the paper's zero-terminal-SNR schedules start (the v form is not). phi = 0
    returns the CFG result itself (bit for bit); phi = 1 gives v the conditional prediction's std per sample.
    """
    out = uncond + w * (cond - uncond)
    if not rescale:
        return out
    alpha, sigma = (per_sample(v, out) for v in path.alpha_sigma(t))
    n = alpha * alpha + sigma * sigma
    xs = x.to(out.dtype)
    std_cond = (alpha * xs - n * cond).std(dim=tuple(range(1, out.ndim)), keepdim=True)
    std_cfg = (alpha * xs - n * out).std(dim=tuple(range(1, out.ndim)), keepdim=True)
    ratio = torch.where(std_cfg > 0, std_cond / std_cfg.clamp_min(torch.finfo(out.dtype).tiny), 1.0)
    k = 1.0 - rescale + rescale * ratio
    return k * out + (1.0 - k) * (alpha / n) * xs


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6):
    eps = eps_uncond + w (eps_cond - eps_uncond); w = 0 is unconditional, w = 1 purely conditional.

    The conditional and unconditional predictions come from one batched call of 2B samples. Since
    x0 and eps are affine in each other at fixed (x, t), guiding x0 is the same as guiding eps.
    ``rescale``: phi of rescaled guidance (:func:`combine_guidance`; 0: off). It is an argument of the guidance
    wrappers, not a wrapper of its own, because it needs both branches, which only they hold.
    """

    def __init__(self, denoiser, w: float | torch.Tensor, null_class: int, rescale: float = 0.0):
        self.w = w if isinstance(w, torch.Tensor) else float(w)     # a (B,) tensor: one scale per sample
        self.denoiser, self.null_class, self.rescale = denoiser, int(null_class), float(rescale)
        self.path = denoiser.path

    def __call__(self, x: torch.Tensor, t: int | float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scalar = not isinstance(self.w, torch.Tensor)
        if scalar and self.w == 1.0:
            return self.denoiser(x, t, y=y)
        null = torch.full_like(y, self.null_class)
        if scalar and self.w == 0.0:
            return self.denoiser(x, t, y=null)
        w = self.w if scalar else per_sample(self.w, x)                    # (B, 1, 1, 1) per sample
        tt = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim else t   # per-sample times follow x
        both = self.denoiser(torch.cat([x, x]), tt, y=torch.cat([y, null]))  # (2B, C, H, W)
        cond, uncond = both.chunk(2)
        return combine_guidance(cond, uncond, w, self.rescale, x, t, self.path)


class AutoguidanceDenoiser:
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 2):
    D_w = D_bad + w (D_good - D_bad), where the guide D_bad is a weaker model of the same class (an earlier
    checkpoint, a smaller network) evaluated with the *same* condition (the class label, or none for an
    unconditional model). w = 1 is the good model alone (the guide is not evaluated), w = 0 the guide alone.
    The two are different networks, so each is one call of B samples. ``rescale`` as :class:`CFGDenoiser`'s."""

    def __init__(self, denoiser, guide_denoiser, w: float, rescale: float = 0.0):
        self.denoiser, self.guide, self.w, self.rescale = denoiser, guide_denoiser, float(w), float(rescale)
        self.path = denoiser.path

    def __call__(self, x: torch.Tensor, t: int | float | torch.Tensor, **extra_args) -> torch.Tensor:
        if self.w == 0.0:
            return self.guide(x, t, **extra_args)
        good = self.denoiser(x, t, **extra_args)
        if self.w == 1.0:
            return good
        return combine_guidance(good, self.guide(x, t, **extra_args), self.w, self.rescale, x, t, self.path)


class IntervalDenoiser:
    """Guidance in a limited interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
    Improves Sample and Distribution Quality in Diffusion Models", Sec. 3): the guided denoiser where the noise
    level lies in [lo, hi], elsewhere the conditional one (w = 1), which costs one network evaluation per sample
    instead of two. The noise level is :func:`noise_to_signal`, sigma_t / alpha_t: the paper's EDM sigma on a
    variance-preserving path and the same quantity on the flow path, so an interval means the same everywhere.
    The paper writes (lo, hi]; the closed interval differs only at a grid time that lands on lo exactly.
    Per-sample times split the batch: the samples inside go to ``guided``, the others to ``plain``."""

    def __init__(self, guided, plain, lo: float, hi: float):
        self.guided, self.plain, self.lo, self.hi = guided, plain, float(lo), float(hi)
        self.path = guided.path

    def __call__(self, x: torch.Tensor, t: int | float | torch.Tensor, **extra_args) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.ndim == 0:
            t = t.item()
        nsr = noise_to_signal(self.path, t)
        if not isinstance(t, torch.Tensor):
            return (self.guided if self.lo <= nsr <= self.hi else self.plain)(x, t, **extra_args)
        inside = ((nsr >= self.lo) & (nsr <= self.hi)).to(x.device)          # (B,)
        if bool(inside.all()) or not bool(inside.any()):
            return (self.guided if bool(inside.all()) else self.plain)(x, t, **extra_args)

        def rows(m):
            return {k: v[m.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim else v
                    for k, v in extra_args.items()}
        a = self.guided(x[inside], t[inside.to(t.device)], **rows(inside))
        b = self.plain(x[~inside], t[~inside.to(t.device)], **rows(~inside))
        out = a.new_empty((x.shape[0], *a.shape[1:]))
        out[inside], out[~inside] = a, b
        return out


class ClampDenoiser:
    """Clip x0_hat to the data range [-lo, hi] (diffusers' ``clip_sample``; Ho et al. 2020 clip
    the predicted x0 to [-1, 1] when sampling)."""

    def __init__(self, denoiser, lo: float = -1.0, hi: float = 1.0):
        self.denoiser, self.lo, self.hi = denoiser, lo, hi
        self.path = denoiser.path

    def __call__(self, x: torch.Tensor, t: int | float | torch.Tensor, **extra_args) -> torch.Tensor:
        return self.denoiser(x, t, **extra_args).clamp(self.lo, self.hi)
