"""``difflo edit``'s techniques as typed functions over a model, shared by the CLI and the web page
(through the table :data:`difflo.edit.registry.TECHNIQUES`, which reads their options).

Each technique takes a loaded :class:`~difflo.model.Model`, an :class:`EditOptions` (tries, sampler,
guidance) and its own inputs, and returns an :class:`EditResult`: the figure's cells and row labels,
the final results, every intermediate image by name, and a summary line. ``EditResult.write`` makes
the files ``difflo edit`` documents (``figure.png``, ``raw.npz``, ``result_XX.png``). The numerical
pieces (denoiser wrappers, the RePaint callback, SDEdit's start) are in :mod:`difflo.edit.operators`.

Times: the grids are the path's own (:mod:`difflo.noise_paths`), ending at the clean data; command-line
times are on the path's ``cli_scale`` (diffusion timesteps 0..T-1; flow per mille).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DiffloError
from ..generate import (SampleSettings, check_guidance, check_sampler, check_steps, generate,
                        time_grid as sample_grid)
from ..images import grid_image, save_image, to_uint8
from ..io import atomic_path
from ..model import Model, make_denoiser
from ..samplers import SeededNoise
from . import operators

EDIT_SAMPLER_PREFERENCE = ("ddpm", "euler")     # stochastic DDPM for diffusion (RePaint's), Euler for flow
ODE_SAMPLERS = ("euler", "ddim")                # what DDIM inversion inverts: Euler on flow (= DDIM there), else DDIM
NOISE_SHOWN_AS = 0.5                            # inverted noise is shown as x_T / 2 (+-2 std fills the grey range)
INPUT_SEED_OFFSET = 10_000                      # a generated input image uses seed + 10000
INPUT_SAMPLER, INPUT_STEPS, INPUT_W = "ddim", 50, 3.0   # ... and is sampled with DDIM 50, w 3


def default_sampler(model: Model) -> str:
    """The editing default: the first of EDIT_SAMPLER_PREFERENCE that fits the model's path."""
    fits = model.path.samplers
    return next((s for s in EDIT_SAMPLER_PREFERENCE if s in fits), fits[0])


def ode_sampler(model: Model) -> str:
    """The deterministic sampler that :func:`difflo.edit.operators.ddim_invert` inverts: Euler on the flow
    path (where DDIM is the same update), DDIM on discrete diffusion."""
    return next(s for s in ODE_SAMPLERS if s in model.path.samplers)


@dataclass
class EditOptions:
    """What every technique shares: one try per seed, the sampler, guidance in each branch, clamping,
    the network's precision (difflo.precision)."""
    seeds: list[int]
    sampler: str
    w: float = 3.0
    clip_x0: bool = True
    precision: str = "auto"
    guidance_interval: tuple[float, ...] = ()    # the guidance options of difflo sample (difflo.guidance)
    guidance_rescale: float = 0.0

    def check(self, model: Model) -> "EditOptions":
        check_sampler(self.sampler, model)
        model.precision(self.precision)
        check_guidance(self.guidance_interval, self.guidance_rescale)
        return self

    def denoiser(self, model: Model):
        """The model as a guided (and clamped) denoiser at these options."""
        return make_denoiser(model, self.w, self.clip_x0, model.precision(self.precision).dtype,
                             interval=self.guidance_interval, rescale=self.guidance_rescale)


@dataclass
class EditResult:
    grid: list[list[torch.Tensor]]            # figure rows of (C, H, W) cells
    row_labels: list[str] | None
    results: torch.Tensor                     # (N, C, H, W): one result_XX.png each
    raw: dict[str, torch.Tensor]              # every image by name -> raw.npz
    summary: str
    seeds: list[int]
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)   # numbers a technique measured (e.g. PSNR)

    def figure(self) -> Image.Image:
        c, h, w = self.results.shape[1:]
        ncol = max(len(r) for r in self.grid)
        blank = torch.ones(1, c, h, w)
        cells = []
        for r in self.grid:
            cells += [x.reshape(1, c, h, w).cpu() for x in r] + [blank] * (ncol - len(r))
        return grid_image(to_uint8(torch.cat(cells)), ncol, self.row_labels)

    def write(self, out: Path, figure: Path | None = None) -> list[str]:
        """figure.png, raw.npz and result_XX.png into ``out`` (and the figure also at ``figure``);
        returns the lines to print."""
        out = Path(out)
        fig = self.figure()
        save_image(fig, out / "figure.png")
        if figure:
            Path(figure).parent.mkdir(parents=True, exist_ok=True)
            save_image(fig, figure)
        u8 = to_uint8(self.results.cpu())
        for i, im in enumerate(u8):
            save_image(Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im), out / f"result_{i:02d}.png")
        with atomic_path(out / "raw.npz") as tmp:
            np.savez_compressed(tmp, **{k: to_uint8(v.cpu()) for k, v in self.raw.items()}, seeds=np.array(self.seeds))
        return [f"note: {n}" for n in self.notes] + [self.summary] + [
            f"wrote {out / 'figure.png'}, {out / 'raw.npz'} and {len(u8)} result PNGs"
            + (f"; figure also at {figure}" if figure else "")]


# ----------------------------------------------------------------------------- shared pieces
def time_grid(model: Model, steps: int | None = None, stride: int | None = None) -> list:
    """The sampling grid of ``steps`` steps on the model's own grid settings (``sample.spacing``, and a
    diffusers folder's ``steps_offset``/``step_rule``/``grid_end``: the grid ``difflo sample`` walks), or the
    strided one (ending at the clean data)."""
    path = model.path
    if stride is not None:
        if stride < 1:
            raise DiffloError(f"--stride must be >= 1, got {stride}")
        return path.strided_times(stride)
    return sample_grid(path, dataclasses.replace(model.cfg.sample, steps=check_steps(steps, model)))


def cli_times(model: Model, values: list[float]) -> list:
    """Command-line times on the path's scale (diffusion timesteps; flow per mille)."""
    try:
        return [model.path.time_from_cli(v) for v in values]
    except ValueError as e:
        raise DiffloError(str(e)) from None


def sample_input(model: Model, c: int | None, seed: int, notes: list[str], precision: str = "auto") -> torch.Tensor:
    """A model sample of class c (DDIM 50, w 3) to edit when no image is given: (1, C, H, W)."""
    c = model.class_index(0 if c is None else c)
    x = generate(model, torch.tensor([c]), [seed + INPUT_SEED_OFFSET],
                 SampleSettings(sampler=INPUT_SAMPLER, steps=INPUT_STEPS, w=INPUT_W, precision=precision))
    notes.append(f"input: a model sample of class {c} (seed {seed + INPUT_SEED_OFFSET})")
    return x


def _t_label(t):
    return f"t={t}" if isinstance(t, int) else f"t={t:.3g}"


def _labels(model: Model, n: int, *classes: int) -> torch.Tensor:
    """(n,) for one class, (n, k) for k classes (one per branch of a combining wrapper)."""
    y = torch.tensor([list(classes)] * n, device=model.device)
    return y.squeeze(1) if len(classes) == 1 else y


# ----------------------------------------------------------------------------- techniques
def forward(model: Model, x0: torch.Tensor, ts: list, seeds: list[int], notes=()) -> EditResult:
    """The forward process q(x_t | x0) at the given times, the same eps at every t (one per seed)."""
    if not ts:
        raise DiffloError("--t needs at least one timestep, e.g. 250,500,750")
    noise = SeededNoise(seeds, x0.shape[1:], x0.device)
    z = noise()
    xs = {f"x_{t}": operators.q_sample(x0.expand_as(z), z, *model.path.alpha_sigma(t)) for t in ts}
    grid = [[x0[0]] + [xs[f"x_{t}"][i] for t in ts] for i in range(len(seeds))]
    results = torch.stack([xs[f"x_{t}"] for t in ts], 1).flatten(0, 1)
    return EditResult(grid, [f"seed {s}" for s in seeds], results, {"clean": x0, **xs},
                      "forward: columns clean, " + ", ".join(_t_label(t) for t in ts), seeds, list(notes))


@torch.no_grad()                  # calls the denoiser itself for the one-step column
def denoise(model: Model, opts: EditOptions, x0: torch.Tensor, c: int, stride: int, i_start: int,
            notes=()) -> EditResult:
    """Blur vs one-step vs iterative denoising of x0 noised to the i_start-th strided time, with PSNR."""
    ts = time_grid(model, stride=stride)
    n = len(ts) - 1
    if not 0 <= i_start < n:
        raise DiffloError(f"--i-start {i_start} out of range: stride {stride} gives {n} timesteps "
                          f"(indices 0..{n - 1})")
    t = ts[i_start]
    c = model.class_index(c)
    den = opts.denoiser(model)
    noise = SeededNoise(opts.seeds, x0.shape[1:], x0.device)
    B = len(opts.seeds)
    y = torch.full((B,), c, device=x0.device)
    x_t = operators.q_sample(x0.expand(B, -1, -1, -1), noise(), *model.path.alpha_sigma(t))
    blur = [operators.best_blur(x_t[i:i + 1], x0) for i in range(B)]
    one = den(x_t, t, y=y)
    it = operators.run_sampler(opts.sampler, den, x_t.clone(), ts[i_start:], {"y": y}, None, noise)
    grid, lines = [], []
    for i in range(B):
        pb, p1, pi = blur[i][3], operators.psnr(one[i:i + 1], x0), operators.psnr(it[i:i + 1], x0)
        grid.append([x0[0], x_t[i], blur[i][0][0], one[i], it[i]])
        lines.append(f"seed {opts.seeds[i]}: noisy {operators.psnr(x_t[i:i + 1], x0):.2f} dB, best blur "
                     f"(kernel {blur[i][1]}, sigma {blur[i][2]:g}) {pb:.2f} dB, one-step {p1:.2f} dB, "
                     f"iterative ({n - i_start} steps, {opts.sampler}) {pi:.2f} dB")
    summary = (f"denoise at {_t_label(t)} (--i-start {i_start}, stride {stride}); columns: clean, noisy, "
               f"blur, one-step, iterative\n  " + "\n  ".join(lines))
    return EditResult(grid, [f"seed {s}" for s in opts.seeds], it,
                      {"clean": x0, "noisy": x_t, "blur": torch.cat([b[0] for b in blur]), "one_step": one,
                       "iterative": it}, summary, opts.seeds, list(notes))


def sdedit(model: Model, opts: EditOptions, x_in: torch.Tensor, c: int, stride: int, levels: list[int],
           notes=()) -> EditResult:
    """SDEdit toward class c from each start level (steps before the clean end of the strided grid)."""
    c = model.class_index(c)
    ts = time_grid(model, stride=stride)
    n = len(ts) - 1
    if not levels or any(not 0 <= k <= n for k in levels):
        raise DiffloError(f"--levels must lie in 0..{n} (stride {stride} gives {n} timesteps); "
                          f"got {','.join(map(str, levels))}")
    den = opts.denoiser(model)
    B = len(opts.seeds)
    y = torch.full((B,), c, device=x_in.device)
    outs = {k: operators.sdedit(den, x_in.expand(B, -1, -1, -1), y, ts, k, opts.seeds, opts.sampler) for k in levels}
    grid = [[x_in[0]] + [outs[k][i] for k in levels] for i in range(B)]
    results = torch.stack([outs[k] for k in levels], 1).flatten(0, 1)
    starts = ", ".join(f"{k}: " + ("input" if k == 0 else _t_label(ts[-k - 1])) for k in levels)
    return EditResult(grid, [f"seed {s}" for s in opts.seeds], results,
                      {"input": x_in, **{f"level_{k}": v for k, v in outs.items()}},
                      f"sdedit toward class {c} (w={opts.w:g}, {opts.sampler}); columns: input, then levels ({starts})",
                      opts.seeds, list(notes))


def inpaint(model: Model, opts: EditOptions, x: torch.Tensor, mask: torch.Tensor, c: int, ts: list,
            jump_length: int = 1, jump_n_sample: int = 1, notes=()) -> EditResult:
    """RePaint: regenerate the mask's 1 region of x as class c."""
    c = model.class_index(c)
    B = len(opts.seeds)
    y = torch.full((B,), c, device=x.device)
    out = operators.inpaint(opts.denoiser(model), x.expand(B, -1, -1, -1), mask, y, ts,
                          opts.seeds, opts.sampler, jump_length=jump_length, jump_n_sample=jump_n_sample)
    shown = x * (1 - mask) + mask * 0.0                      # the regenerated region shown grey
    grid = [[x[0], shown[0]] + [out[i] for i in range(B)]]
    return EditResult(grid, None, out, {"input": x, "masked": shown, "inpainted": out},
                      f"inpaint as class {c} (w={opts.w:g}, {opts.sampler}, {len(ts) - 1} steps, jump length "
                      f"{jump_length}, {jump_n_sample} samples per jump); columns: input, masked (grey = "
                      f"regenerated), tries", opts.seeds, list(notes))


def anagram(model: Model, opts: EditOptions, a: int, b: int, view: str, ts: list) -> EditResult:
    """An image that reads as class a upright and class b under ``view``."""
    A, B_ = model.class_index(a, "--a"), model.class_index(b, "--b")
    den = operators.AnagramDenoiser(opts.denoiser(model), ["identity", view])
    shape = (model.cfg.model.in_channels, model.cfg.model.image_size, model.cfg.model.image_size)
    out = operators.sample_plain(den, _labels(model, len(opts.seeds), A, B_), ts, opts.seeds, shape, opts.sampler)
    viewed = operators.apply_view(out, view)
    return EditResult([list(out), list(viewed)], [f"{A} upright", f"{B_} {view}"], out,
                      {"anagram": out, "viewed": viewed},
                      f"anagram: class {A} upright, class {B_} under {view} (w={opts.w:g}, {opts.sampler}); "
                      f"row 1 as generated, row 2 the same images under {view}", opts.seeds)


def hybrid(model: Model, opts: EditOptions, low: int, high: int, kernel_size: int, sigma: float,
           ts: list) -> EditResult:
    """Low frequencies from class ``low``, high frequencies from class ``high``."""
    lo, hi = model.class_index(low, "--low"), model.class_index(high, "--high")
    den = operators.HybridDenoiser(opts.denoiser(model), kernel_size, sigma)
    shape = (model.cfg.model.in_channels, model.cfg.model.image_size, model.cfg.model.image_size)
    out = operators.sample_plain(den, _labels(model, len(opts.seeds), lo, hi), ts, opts.seeds, shape, opts.sampler)
    low_img = den.lowpass(out)
    high_img = (out - low_img).clamp(-1, 1)
    return EditResult([list(out), list(low_img), list(high_img)], ["hybrid", f"lowpass ({lo})", f"highpass ({hi})"],
                      out, {"hybrid": out, "lowpass": low_img, "highpass": high_img},
                      f"hybrid: low frequencies of class {lo}, high of class {hi} (Gaussian kernel {kernel_size}, "
                      f"sigma {sigma:g}; w={opts.w:g}, {opts.sampler})", opts.seeds)


# ----------------------------------------------------------------------------- inversion, interpolation
def _check_ode_sampler(opts: EditOptions, model: Model) -> str:
    if opts.sampler not in ODE_SAMPLERS:
        raise DiffloError(f"DDIM inversion is undone by {ode_sampler(model)} (deterministic, the same update); "
                          f"got sampler {opts.sampler}")
    return opts.sampler


def _noise_image(z: torch.Tensor) -> torch.Tensor:
    return (z * NOISE_SHOWN_AS).clamp(-1, 1)


def invert(model: Model, opts: EditOptions, x: torch.Tensor, c: int, steps: list[int], notes=()) -> EditResult:
    """DDIM inversion of x (1, C, H, W) to noise and back, conditioned on class c, once per step count:
    the reconstruction PSNR per step count (``metrics["psnr_N"]``), against sampling the same grid from
    a random seed's noise (``metrics["psnr_random_N"]``, seed ``opts.seeds[0]``). With w != 1 the w = 1
    round trip is measured too (``metrics["psnr_N_w1"]``): guidance amplifies the mismatch between
    each inversion step and the sampler step that undoes it (Mokady et al. 2023)."""
    c = model.class_index(c)
    sampler = _check_ode_sampler(opts, model)
    steps = list(dict.fromkeys(check_steps(n, model) for n in steps))
    if not steps:
        raise DiffloError("--steps needs at least one step count, e.g. 10,20,50")
    notes = list(notes)
    y = torch.tensor([c], device=x.device)
    ws = [opts.w] + ([1.0] if opts.w != 1.0 and model.num_classes else [])
    grids = {n: time_grid(model, steps=n) for n in steps}
    recon, noise, metrics = {}, {}, {}
    for w in ws:
        den = dataclasses.replace(opts, w=w).denoiser(model)
        suffix = "" if w == opts.w else "_w1"
        for n, ts in grids.items():
            z = operators.ddim_invert(den, x, ts, {"y": y})
            recon[n, w] = operators.run_sampler(sampler, den, z.clone(), ts, {"y": y}, None, None)
            noise[n, w] = z
            metrics[f"psnr_{n}{suffix}"] = operators.psnr(recon[n, w], x)
    den = opts.denoiser(model)
    seed = opts.seeds[0]
    for n, ts in grids.items():
        z = SeededNoise([seed], x.shape[1:], x.device)()
        metrics[f"psnr_random_{n}"] = operators.psnr(operators.run_sampler(sampler, den, z, ts, {"y": y}, None, None), x)

    two = len(ws) > 1
    head = "  steps" + "".join(f"{f'w={w:g}':>8}" for w in ws) + f"  random noise (seed {seed}, w={opts.w:g})"
    rows = [f"  {n:>5}" + "".join(f"{metrics[f'psnr_{n}' + ('' if w == opts.w else '_w1')]:8.2f}" for w in ws)
            + f"  {metrics[f'psnr_random_{n}']:8.2f}" for n in steps]
    what = model.class_label(c) if model.num_classes else "unconditional"
    notes += [f"reconstruction PSNR (dB): DDIM inversion, then {sampler} back over the same grid, {what}:",
              head, *rows]
    if opts.w > 1.0 and model.num_classes:
        notes.append(f"inversion with classifier-free guidance (w={opts.w:g} > 1) is inexact: guidance amplifies the "
                     f"mismatch between each inversion step and the sampler step that undoes it (Mokady et al. "
                     f"2023); measured against w=1: "
                     + ", ".join(f"{metrics[f'psnr_{n}'] - metrics[f'psnr_{n}_w1']:+.2f} dB at {n} steps"
                                 for n in steps))
    grid, labels, results, raw = [], [], [], {"input": x}
    for w in ws:
        suffix = "" if w == opts.w else "_w1"
        for n in steps:
            grid.append([x[0], _noise_image(noise[n, w])[0], recon[n, w][0]])
            labels.append((f"w={w:g} " if two else "") + f"{n} steps {metrics[f'psnr_{n}{suffix}']:.1f} dB")
            results.append(recon[n, w])
            raw[f"recon_{n}{suffix}"] = recon[n, w]
            raw[f"noise_{n}{suffix}"] = _noise_image(noise[n, w])
    summary = (f"invert: DDIM inversion to noise and {sampler} back, {what} (w={opts.w:g}, trailing grid): "
               + ", ".join(f"{metrics[f'psnr_{n}']:.2f} dB at {n} steps" for n in steps)
               + f"; columns: input, inverted noise (shown as x_T * {NOISE_SHOWN_AS:g}), reconstruction")
    return EditResult(grid, labels, torch.cat(results), raw, summary, [seed], notes, metrics)


def interpolate(model: Model, opts: EditOptions, a: torch.Tensor | int, b: torch.Tensor | int,
                class_a: int | None, class_b: int | None, frames: int, ts: list, notes=()) -> EditResult:
    """``frames`` images between two noises: each end is an image (1, C, H, W), DDIM-inverted with its
    class, or a seed (its initial noise, as ``difflo sample --seed``). Frame k (a = k / (frames - 1))
    samples ``slerp(z_a, z_b, a)`` with the class embedding ``(1 - a) E[class_a] + a E[class_b]``. No
    class: unconditional (the null class); one class: the same at both ends."""
    if frames < 2:
        raise DiffloError(f"--frames must be >= 2 (the two ends), got {frames}")
    sampler = _check_ode_sampler(opts, model)
    notes = list(notes)
    k = model.num_classes
    if k:
        if class_a is None and class_b is None:
            class_a = class_b = k                                       # the null class: unconditional
            notes.append("no --class-a/--class-b: unconditional (the null class)")
        else:
            ca = None if class_a is None else model.class_index(class_a, "--class-a")
            cb = None if class_b is None else model.class_index(class_b, "--class-b")
            class_a, class_b = (cb if ca is None else ca), (ca if cb is None else cb)
    else:
        class_a = class_b = 0
    device = model.device
    shape = (model.cfg.model.in_channels, model.cfg.model.image_size, model.cfg.model.image_size)
    den = opts.denoiser(model)
    zs, inputs, seeds, what = [], {}, [], []
    for side, end, c in (("a", a, class_a), ("b", b, class_b)):
        if isinstance(end, torch.Tensor):
            x = end.to(device)
            inputs[side] = x
            zs.append(operators.ddim_invert(den, x, ts, {"y": torch.tensor([c], device=device)}))
            what.append(f"image {side.upper()} (inverted)")
        else:
            seeds.append(int(end))
            zs.append(SeededNoise([int(end)], shape, device)())
            what.append(f"seed {int(end)}")
    alphas = [j / (frames - 1) for j in range(frames)]                  # exactly 0 and 1 at the ends
    z = torch.cat([operators.slerp(zs[0], zs[1], t) for t in alphas])
    if k:
        mixer = operators.ClassMixNet(model.net, k, operators.ClassMixNet.mix(k, class_a, class_b, alphas))
        mixed = dataclasses.replace(model, net=mixer)
        y = torch.tensor([mixer.label(j) for j in range(frames)], device=device)
        out = operators.run_sampler(sampler, opts.denoiser(mixed), z.clone(), ts, {"y": y}, None, None)
    else:
        y = torch.zeros(frames, dtype=torch.long, device=device)
        out = operators.run_sampler(sampler, den, z.clone(), ts, {"y": y}, None, None)
    metrics = {}
    grid, labels = [list(out)], ["frames"]
    if inputs and opts.w > 1.0 and k:
        notes.append(f"image ends inverted with classifier-free guidance (w={opts.w:g} > 1): inexact, the end frames "
                     f"reconstruct their images less well than at w=1 (see difflo edit invert)")
    if inputs:
        blank = torch.ones(shape, device=out.device)
        grid.append([inputs["a"][0] if "a" in inputs else blank] + [blank] * (frames - 2)
                    + [inputs["b"][0] if "b" in inputs else blank])
        labels.append("inputs")
        for side, j in (("a", 0), ("b", frames - 1)):
            if side in inputs:
                metrics[f"psnr_{side}"] = operators.psnr(out[j:j + 1], inputs[side])
                notes.append(f"frame {j} reconstructs image {side.upper()} at {metrics[f'psnr_{side}']:.2f} dB")
    name = lambda c: model.class_label(c) if k and c < k else "unconditional"
    classes = name(class_a) if class_a == class_b else f"class embedding {name(class_a)} -> {name(class_b)}"
    summary = (f"interpolate: {frames} frames from {what[0]} to {what[1]}: slerp of the noises, {classes} "
               f"(w={opts.w:g}, {sampler}, {len(ts) - 1} steps)")
    raw = {"frames": out, "noise": _noise_image(z), **{f"input_{s}": v for s, v in inputs.items()}}
    return EditResult(grid, labels, out, raw, summary, seeds, notes, metrics)
