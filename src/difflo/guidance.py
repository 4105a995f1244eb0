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

import torch

from .diffusion import to_x0


class ModelDenoiser:
    """Wrap a network ``net(x, time, y) -> output`` trained with ``prediction`` on ``path``.

    ``autocast``: run the network under ``torch.autocast`` to this dtype (e.g. bfloat16; None: off);
    ``dtype``: the dtype of x0_hat, computed from the network's output and ``x`` converted to it (float32
    for sampling, float64 for the likelihood). The network itself gets ``x`` in float32 (as EDM's
    preconditioning casts it)."""

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
            out = self.net(x.float(), self.path.model_time(tt), y)
        return to_x0(out.to(self.dtype), x.to(self.dtype), alpha, sigma, self.prediction)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6):
    eps = eps_uncond + w (eps_cond - eps_uncond); w = 0 is unconditional, w = 1 purely conditional.

    The conditional and unconditional predictions come from one batched call of 2B samples. Since
    x0 and eps are affine in each other at fixed (x, t), guiding x0 is the same as guiding eps.
    """

    def __init__(self, denoiser, w: float, null_class: int):
        self.denoiser, self.w, self.null_class = denoiser, float(w), int(null_class)
        self.path = denoiser.path

    def __call__(self, x: torch.Tensor, t: int | float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.w == 1.0:
            return self.denoiser(x, t, y=y)
        null = torch.full_like(y, self.null_class)
        if self.w == 0.0:
            return self.denoiser(x, t, y=null)
        tt = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim else t   # per-sample times follow x
        both = self.denoiser(torch.cat([x, x]), tt, y=torch.cat([y, null]))  # (2B, C, H, W)
        cond, uncond = both.chunk(2)
        return uncond + self.w * (cond - uncond)


class ClampDenoiser:
    """Clip x0_hat to the data range [-lo, hi] (diffusers' ``clip_sample``; Ho et al. 2020 clip
    the predicted x0 to [-1, 1] when sampling)."""

    def __init__(self, denoiser, lo: float = -1.0, hi: float = 1.0):
        self.denoiser, self.lo, self.hi = denoiser, lo, hi
        self.path = denoiser.path

    def __call__(self, x: torch.Tensor, t: int | float | torch.Tensor, **extra_args) -> torch.Tensor:
        return self.denoiser(x, t, **extra_args).clamp(self.lo, self.hi)
