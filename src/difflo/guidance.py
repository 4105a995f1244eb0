"""Denoisers: the one interface every sampler consumes, and the wrappers around it.

A *denoiser* is a callable ``denoiser(x, t, **extra_args) -> x0_hat`` with an attribute ``path``
that has ``alpha_sigma(t)``: given a noisy batch ``x = alpha_t x0 + sigma_t eps`` (B, C, H, W) at
timestep ``t`` (a Python int, the same for the whole batch) it returns the estimate of ``x0``
(k-diffusion and EDM call this "denoised"). Samplers derive ``eps_hat = (x - alpha_t x0_hat) /
sigma_t`` themselves. Because eps, x0 and v are affine in each other at fixed ``x`` and ``t``,
every wrapper below (guidance, clamping, and the editing wrappers) means the same thing whichever
parameterization the network was trained with.
"""
from __future__ import annotations

import torch

from .diffusion import to_x0


class ModelDenoiser:
    """Wrap a network ``net(x, time, y) -> output`` trained with ``prediction`` on ``path``.
    ``autocast``: run the network under ``torch.autocast`` to this dtype (e.g. bfloat16); the
    output is converted back to float32 before anything else is computed."""

    def __init__(self, net: torch.nn.Module, path, prediction: str, autocast: torch.dtype | None = None):
        self.net, self.path, self.prediction, self.autocast = net, path, prediction, autocast

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: int, y: torch.Tensor | None = None) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device)
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.net(x, self.path.model_time(tt), y)
        alpha, sigma = self.path.alpha_sigma(t)
        return to_x0(out.float(), x.float(), alpha, sigma, self.prediction)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6):
    eps = eps_uncond + w (eps_cond - eps_uncond); w = 0 is unconditional, w = 1 purely conditional.

    The conditional and unconditional predictions come from one batched call of 2B samples. Since
    x0 and eps are affine in each other at fixed (x, t), guiding x0 is the same as guiding eps.
    """

    def __init__(self, denoiser, w: float, null_class: int):
        self.denoiser, self.w, self.null_class = denoiser, float(w), int(null_class)
        self.path = denoiser.path

    def __call__(self, x: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        if self.w == 1.0:
            return self.denoiser(x, t, y=y)
        null = torch.full_like(y, self.null_class)
        if self.w == 0.0:
            return self.denoiser(x, t, y=null)
        both = self.denoiser(torch.cat([x, x]), t, y=torch.cat([y, null]))   # (2B, C, H, W)
        cond, uncond = both.chunk(2)
        return uncond + self.w * (cond - uncond)


class ClampDenoiser:
    """Clip x0_hat to the data range [-lo, hi] (diffusers' ``clip_sample``; Ho et al. 2020 clip
    the predicted x0 to [-1, 1] when sampling)."""

    def __init__(self, denoiser, lo: float = -1.0, hi: float = 1.0):
        self.denoiser, self.lo, self.hi = denoiser, lo, hi
        self.path = denoiser.path

    def __call__(self, x: torch.Tensor, t: int, **extra_args) -> torch.Tensor:
        return self.denoiser(x, t, **extra_args).clamp(self.lo, self.hi)
