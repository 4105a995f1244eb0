"""Image editing in the sampling loop: denoiser wrappers and sampler callbacks, never a copied loop.

Every technique reuses a sampler from :data:`difflo.samplers.SAMPLERS` unchanged:

* **anagram** and **hybrid** are denoiser wrappers. Because eps and x0 are affine in each other at
  fixed ``(x, t)`` (``eps = (x - alpha x0) / sigma``), combining x0 predictions with *linear* maps
  that are undone on the output is the same as combining eps predictions:

  - anagram (Geng et al. 2024, "Visual Anagrams"):
    ``eps = mean_i V_i^-1 eps(V_i x, c_i)``  <=>  ``x0 = mean_i V_i^-1 D(V_i x, c_i)`` for
    orthogonal views V_i (flips, rotations: permutations of pixels, so ``V x_t`` is still a noisy
    image at the same t);
  - hybrid (Geng et al. "Factorized Diffusion"):
    ``eps = lowpass(eps(x, A)) + highpass(eps(x, B))`` <=> ``x0 = lowpass(D(x, A)) + highpass(D(x, B))``
    since ``lowpass + highpass = identity``.

  Guidance is applied inside each branch (the wrapped denoiser is a :class:`~difflo.guidance.CFGDenoiser`),
  then the branches are combined. ``tests/unit/test_editing.py`` checks both identities against an
  explicit eps computation.
* **inpaint** (Lugmayr et al. 2022, "RePaint") is a sampler callback that, after every step to
  ``t_prev``, replaces the known region of ``x`` by the forward-noised original at ``t_prev``; the
  last step goes to the clean data, where the known pixels are the original exactly. Resampling
  jumps run the sampler on slices of the time grid (grids contain their clean end, so a chunk is
  ``ts[i:j + 1]``), re-noising between repeats with ``q(x_t | x_t')``.
* **sdedit** (Meng et al. 2022, "SDEdit") noises the input to the time k steps before the clean end
  of the grid and runs the sampler over the last k steps.
* **invert** (Song et al. 2021, "DDIM", Sec. 4.3) runs the deterministic DDIM update up the grid,
  from the image to its noise (:func:`ddim_invert`); sampling that noise back with DDIM (Euler on
  the flow path) at the same grid reconstructs the image up to the discretisation error.
* **interpolate**: :func:`slerp` between two noises, and a linear mix of the class embeddings
  passed to the network as class weights (:class:`ClassMixNet`).

Conventions: masks are 1 where the image is *regenerated* (white in a mask file), 0 where known.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..diffusion import q_sample
from ..errors import DiffloError
from ..samplers import SAMPLERS, SeededNoise

# ----------------------------------------------------------------------------- views
VIEWS = ("identity", "flip", "hflip", "rot90", "rot180", "rot270")


def apply_view(x: torch.Tensor, view: str, inverse: bool = False) -> torch.Tensor:
    """An orthogonal view of a (B, C, H, W) batch: ``flip`` = upside down, ``hflip`` = mirror,
    ``rotK`` = rotation by K degrees counter-clockwise; ``inverse`` undoes it."""
    if view == "identity":
        return x
    if view == "flip":
        return x.flip(-2)
    if view == "hflip":
        return x.flip(-1)
    if view in ("rot90", "rot180", "rot270"):
        k = int(view[3:]) // 90
        return torch.rot90(x, -k if inverse else k, dims=(-2, -1))
    raise DiffloError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")


# ----------------------------------------------------------------------------- filters
def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    if size < 1 or size % 2 == 0:
        raise DiffloError(f"Gaussian kernel size must be odd and >= 1, got {size}")
    if size == 1 or sigma <= 0:
        k = torch.zeros(size, dtype=torch.float64)
        k[size // 2] = 1.0
        return k
    r = torch.arange(size, dtype=torch.float64) - size // 2
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; size 1 or sigma 0 is the identity."""
    k = gaussian_kernel1d(size, sigma).to(x)
    if size == 1:
        return x
    c = x.shape[1]
    p = size // 2
    mode = "reflect" if p < min(x.shape[-2:]) else "replicate"
    y = F.pad(x, (p, p, p, p), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


# ----------------------------------------------------------------------------- denoiser wrappers
class AnagramDenoiser:
    """x0 = mean_i V_i^-1 D(V_i x, y[:, i]): one class per view, all views in one batched call.
    Called with ``y`` of shape (B, len(views))."""

    def __init__(self, denoiser, views):
        for v in views:
            apply_view(torch.zeros(1, 1, 2, 2), v)          # validate names
        self.denoiser, self.views, self.path = denoiser, list(views), denoiser.path

    def __call__(self, x: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        n = len(self.views)
        xs = torch.cat([apply_view(x, v) for v in self.views])               # (nB, C, H, W)
        ys = torch.cat([y[:, i] for i in range(n)])
        outs = self.denoiser(xs, t, y=ys).chunk(n)
        return sum(apply_view(o, v, inverse=True) for o, v in zip(outs, self.views)) / n


class HybridDenoiser:
    """x0 = lowpass(D(x, y[:, 0])) + highpass(D(x, y[:, 1])), highpass = identity - lowpass.
    Called with ``y`` of shape (B, 2): (low-frequency class, high-frequency class)."""

    def __init__(self, denoiser, kernel_size: int = 13, sigma: float = 2.0):
        gaussian_kernel1d(kernel_size, sigma)
        self.denoiser, self.kernel_size, self.sigma, self.path = denoiser, kernel_size, sigma, denoiser.path

    def lowpass(self, x):
        return gaussian_blur(x, self.kernel_size, self.sigma)

    def __call__(self, x: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        low, high = self.denoiser(torch.cat([x, x]), t, y=torch.cat([y[:, 0], y[:, 1]])).chunk(2)
        return high + self.lowpass(low - high)             # = lp(low) + (high - lp(high))


def renoise(x: torch.Tensor, path, t_from, t_to, z: torch.Tensor) -> torch.Tensor:
    """A draw of q(x_{t_to} | x_{t_from}) for t_to later (noisier) than t_from:
    x_to = (a_to / a_from) x_from + sqrt(s_to^2 - (a_to s_from / a_from)^2) z."""
    a_f, s_f = path.alpha_sigma(t_from)
    a_t, s_t = path.alpha_sigma(t_to)
    r = a_t / a_f
    return r * x + max(s_t**2 - (r * s_f) ** 2, 0.0) ** 0.5 * z


# ----------------------------------------------------------------------------- techniques
def _ts_list(ts):
    return ts.tolist() if isinstance(ts, torch.Tensor) else [t.item() if isinstance(t, torch.Tensor) else t for t in ts]


def run_sampler(sampler: str, denoiser, x, ts, extra_args, callback, noise, **kw):
    """``SAMPLERS[sampler]`` over the grid ``ts`` (which ends where the run should end)."""
    if sampler not in SAMPLERS:
        raise DiffloError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler](denoiser, x, ts, extra_args=extra_args, callback=callback, noise=noise, **kw)


@torch.no_grad()
def sdedit(denoiser, x_in: torch.Tensor, y, ts, k: int, seeds, sampler: str = "ddim", callback=None, **kw):
    """Noise ``x_in`` to ``ts[-k - 1]`` (k steps before the grid's clean end) and sample over
    ``ts[-k - 1:]``. k = 0 returns the input; k = len(ts) - 1 starts from pure noise, exactly as
    plain sampling."""
    ts = _ts_list(ts)
    n = len(ts) - 1                                            # steps in the grid
    if not 0 <= k <= n:
        raise DiffloError(f"SDEdit start level {k} out of range 0..{n}")
    noise = SeededNoise(seeds, x_in.shape[1:], x_in.device)
    z = noise()
    if k == 0:
        return x_in.clone()
    if k == n:
        x = z * denoiser.path.prior_std                        # x_T ~ N(0, I) (EDM: sigma_max z), as generate
    else:
        a, s = denoiser.path.alpha_sigma(ts[-k - 1])
        x = q_sample(x_in, z, a, s)
    return run_sampler(sampler, denoiser, x, ts[-k - 1:], {"y": y}, callback, noise, **kw)


class RePaintCallback:
    """After each step to t_prev: x <- mask * x + (1 - mask) * q_sample(x_known, z, t_prev)."""

    def __init__(self, x_known, mask, path, noise, user_callback=None):
        self.x_known, self.mask, self.path = x_known, mask, path
        self.noise, self.user_callback = noise, user_callback

    def __call__(self, d):
        a, s = self.path.alpha_sigma(d["t_prev"])
        known = self.x_known if s == 0 else q_sample(self.x_known, self.noise(), a, s)
        d["x"].copy_(self.mask * d["x"] + (1 - self.mask) * known)      # in place: the sampler goes on with it
        if self.user_callback is not None:
            self.user_callback(d)


def repaint_chunks(n: int, jump_length: int, jump_n_sample: int) -> list[tuple[int, int, bool]]:
    """(start, end, renoise_before) index ranges over a grid of n steps (n + 1 times, index n = the
    clean end): each chunk ``ts[start:end + 1]`` of ``jump_length`` steps is run ``jump_n_sample``
    times, re-noised back to its start between runs."""
    out = []
    for start in range(0, n, jump_length):
        end = min(start + jump_length, n)
        for r in range(jump_n_sample):
            out.append((start, end, r > 0))
    return out


@torch.no_grad()
def inpaint(denoiser, x_known: torch.Tensor, mask: torch.Tensor, y, ts, seeds, sampler: str = "ddpm",
            jump_length: int = 1, jump_n_sample: int = 1, callback=None, **kw):
    """RePaint: mask (B or 1, 1, H, W), 1 = regenerate. With ``jump_n_sample`` = 1 there are no jumps."""
    if jump_length < 1 or jump_n_sample < 1:
        raise DiffloError("--jump-length and --jump-n-sample must be >= 1")
    ts = _ts_list(ts)
    path = denoiser.path
    noise = SeededNoise(seeds, x_known.shape[1:], x_known.device)
    x = noise() * path.prior_std
    mask = mask.to(x)
    cb = RePaintCallback(x_known, mask, path, noise, callback)
    if jump_n_sample == 1:
        return run_sampler(sampler, denoiser, x, ts, {"y": y}, cb, noise, **kw)
    for start, end, jump in repaint_chunks(len(ts) - 1, jump_length, jump_n_sample):
        if jump:
            x = renoise(x, path, ts[end], ts[start], noise())
        x = run_sampler(sampler, denoiser, x, ts[start:end + 1], {"y": y}, cb, noise, **kw)   # a slice of the grid
    return x


@torch.no_grad()
def sample_plain(denoiser, y, ts, seeds, shape, sampler: str = "ddim", callback=None, **kw):
    """Sampling from pure noise with per-sample seeds (for the anagram and hybrid wrappers)."""
    noise = SeededNoise(seeds, shape)
    return run_sampler(sampler, denoiser, noise() * denoiser.path.prior_std, _ts_list(ts), {"y": y}, callback, noise,
                       **kw)


# ----------------------------------------------------------------------------- metrics, baselines
def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak 1 on the [0, 1] scale)."""
    mse = (((x.clamp(-1, 1) - ref) / 2) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def best_blur(noisy: torch.Tensor, clean: torch.Tensor, sigmas=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)):
    """The Gaussian blur (kernel size 2 ceil(3 sigma) + 1) with the best PSNR against the clean image
    (an oracle choice, so the baseline is as strong as it can be): (image, size, sigma, psnr)."""
    best = None
    for s in sigmas:
        size = 2 * math.ceil(3 * s) + 1
        out = gaussian_blur(noisy, size, s)
        p = psnr(out, clean)
        if best is None or p > best[3]:
            best = (out, size, s, p)
    return best


# ----------------------------------------------------------------------------- inversion, interpolation
@torch.no_grad()
def ddim_invert(denoiser, x0: torch.Tensor, ts, extra_args=None, callback=None) -> torch.Tensor:
    """DDIM inversion (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Sec. 4.3 and
    Eq. 13: the eta = 0 update is an Euler step of the probability-flow ODE, which can be run from
    data to noise). ``ts`` is a sampling grid (noise end first, clean end last); it is walked
    backwards, and each step from t to the noisier t_next is DDIM's update with the roles swapped::

        x0_hat = D(x_t, t),  eps_hat = (x_t - alpha_t x0_hat) / sigma_t,
        x_{t_next} = alpha_{t_next} x0_hat + sigma_{t_next} eps_hat

    i.e. for diffusion ``x_{t+1} = sqrt(abar_{t+1}) x0_hat + sqrt(1 - abar_{t+1}) eps_hat`` with the
    prediction at the current ``x_t``. On the flow path (alpha = 1 - t, sigma = t) the same update is
    exactly the backward Euler-in-time step ``x_{t_next} = x_t + (t_next - t) u(x_t, t)`` with
    ``u = eps_hat - x0_hat``, t from 0 to 1 (tested). At the clean end (sigma = 0) eps is undefined:
    the first step takes it from the denoiser at the next time, ``D(x0, t_next)`` (the smallest noise
    level of the grid), as implementations that evaluate the network at the target time do throughout
    (diffusers' DDIMInverseScheduler, Mokady et al. 2023).

    The sampler evaluates the network at the other end of each step (x_{t_next}, t_next), so the round
    trip is exact only as the step size goes to 0, and only for the same denoiser in both directions:
    with classifier-free guidance w > 1 the guided eps is far from the ODE's and the error grows with w
    (Mokady et al. 2023, "Null-text Inversion", Sec. 3). Returns x at ``ts[0]`` (the grid's noise end).
    ``callback`` gets ``{"i", "t", "t_next", "x", "denoised"}`` after every step."""
    extra_args = extra_args or {}
    path = denoiser.path
    ts = _ts_list(ts)[::-1]                                    # clean end first
    x = x0
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        a, s = path.alpha_sigma(t)
        a_n, s_n = path.alpha_sigma(t_next)
        if s == 0:                                             # the clean end: eps from the next time
            d = denoiser(x, t_next, **extra_args)
            eps = (x - a_n * d) / s_n
        else:
            d = denoiser(x, t, **extra_args)
            eps = (x - a * d) / s
        x = a_n * d + s_n * eps
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "denoised": d})
    return x


def slerp(z0: torch.Tensor, z1: torch.Tensor, a: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) per sample of (B, ...) batches:
    ``slerp(z0, z1; a) = sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1`` with
    ``cos theta = <z0, z1> / (|z0| |z1|)``. a = 0 and a = 1 return z0 and z1 exactly; between
    orthogonal unit vectors the norm stays 1. Where z0 and z1 are (anti)parallel (sin theta < eps)
    it falls back to the linear ``(1 - a) z0 + a z1``. Gaussian noises in high dimension are nearly
    orthogonal with norm ~sqrt(d), so slerp keeps intermediate noises on the shell where the model
    was trained, where a linear mix would shrink them (by 1/sqrt(2) at a = 1/2)."""
    a = float(a)
    if a == 0.0:
        return z0.clone()
    if a == 1.0:
        return z1.clone()
    f0, f1 = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    linear = sin < eps
    safe = torch.where(linear, torch.ones_like(sin), sin)
    c0 = torch.where(linear, torch.full_like(sin, 1.0 - a), torch.sin((1.0 - a) * theta) / safe)
    c1 = torch.where(linear, torch.full_like(sin, a), torch.sin(a * theta) / safe)
    shape = (-1,) + (1,) * (z0.dim() - 1)
    return (c0.view(shape) * z0.double() + c1.view(shape) * z1.double()).to(z0.dtype)


class ClassMixNet(torch.nn.Module):
    """A network wrapper whose labels ``num_classes + 1 + j`` mean the class-embedding mix ``mixes[j]``
    (one weight per row of the class-embedding table, the null class included). Ordinary labels (the
    classes and the null class) become one-hot weights, which give exactly their own embedding, so
    classifier-free guidance (which asks for the null class) and every denoiser wrapper work on top of
    it. The network must accept ``class_weights`` (:class:`difflo.nn.UNet` does:
    ``emb = sum_k class_weights[:, k] E[k]``).

    For interpolation, ``mixes[j] = (1 - a_j) onehot(c_a) + a_j onehot(c_b)`` gives the embedding
    ``(1 - a_j) E[c_a] + a_j E[c_b]``."""

    def __init__(self, net, num_classes: int, mixes: torch.Tensor):
        super().__init__()
        self.net, self.num_classes = net, int(num_classes)
        self.register_buffer("mixes", mixes.float(), persistent=False)

    @staticmethod
    def mix(num_classes: int, c_a: int, c_b: int, a) -> torch.Tensor:
        """Rows ``(1 - a) onehot(c_a) + a onehot(c_b)`` over the ``num_classes + 1`` embeddings."""
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
        eye = torch.eye(num_classes + 1, dtype=torch.float64)
        return ((1 - a) * eye[c_a] + a * eye[c_b]).float()

    def label(self, j: int) -> int:
        """The label that selects ``mixes[j]``."""
        return self.num_classes + 1 + j

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            return self.net(x, time, y)
        k = self.num_classes + 1
        table = torch.cat([torch.eye(k, device=y.device), self.mixes.to(y.device)])   # (k + mixes, k)
        return self.net(x, time, None, class_weights=table[y])
