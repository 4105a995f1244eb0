"""``difflo edit TECHNIQUE``: forward, denoise, sdedit, inpaint, anagram, hybrid (see docs/editing.md).

Each technique writes into ``--out DIR``: ``figure.png`` (a labelled grid), ``raw.npz`` (every image
as uint8 (N, H, W, C), by name) and one PNG per final result (``result_XX.png``).

Input images (PNG/JPG) are converted to the model's channels (L for 1 channel, RGB for 3; an alpha
channel is composited on black), resized to the model's image size (the command says so) and scaled
to [-1, 1]. A mask is white (>= 128) where the image is regenerated; it must have the image's size.
Timesteps are the model's own (0..T-1) for diffusion; for flow models the same per-mille scale
(``--t 500`` is t = 0.5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import editing
from .errors import DiffloError

TECHNIQUES = ("forward", "denoise", "sdedit", "inpaint", "anagram", "hybrid")


# ----------------------------------------------------------------------------- image files
def _open(path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise DiffloError(f"image {path} not found") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise DiffloError(f"cannot read image {path}: {e} (give a PNG or JPG)") from None


def _flatten_alpha(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (I;16*), 32-bit integer (I) and float (F) greyscale -> 8-bit L, scaled to the range the
    values use (PIL's convert clips instead: a 16-bit mid-grey would become white); LAB -> RGB."""
    if img.mode == "LAB":                              # PIL converts LAB only through a colour profile
        from PIL import ImageCms
        lab_to_rgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                             "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_rgb)
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    a = np.asarray(img, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
        top = 1.0                                     # float images in [0, 1]
    else:
        top = 255.0 if not a.size or a.max() <= 255 else 65535.0 if a.max() <= 65535 else a.max()
    return Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), "L")


def load_image(path, channels: int, size: int, notes: list | None = None) -> torch.Tensor:
    """(1, C, size, size) in [-1, 1] from a PNG/JPG; converts channels and resizes, noting both."""
    img = _open(path)
    notes = notes if notes is not None else []
    if channels not in (1, 3):
        raise DiffloError(f"this model has {channels} channels; image files can be loaded for 1 (L) or 3 (RGB)")
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        notes.append(f"{path}: converted {img.mode} to {mode} for a {channels}-channel model"
                     + (" (alpha composited on black)" if "A" in img.mode else ""))
        try:
            img = _flatten_alpha(_to_8bit(img)).convert(mode)
        except (ValueError, OSError) as e:
            raise DiffloError(f"cannot convert image {path} from mode {img.mode} to {mode} ({e}); "
                              f"save it as an 8-bit RGB or greyscale PNG") from None
    if img.size != (size, size):
        notes.append(f"{path}: resized {img.size[0]}x{img.size[1]} to the model's {size}x{size}")
        img = img.resize((size, size), Image.LANCZOS)
    a = np.asarray(img, dtype=np.float32).reshape(size, size, channels) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).contiguous()


def load_mask(path, image_path, size: int) -> torch.Tensor:
    """(1, 1, size, size) of 0/1: 1 (white, >= 128) = regenerate. Must be as large as the image."""
    m = _open(path)
    im = _open(image_path)
    if m.size != im.size:
        raise DiffloError(f"mask {path} is {m.size[0]}x{m.size[1]} but image {image_path} is "
                          f"{im.size[0]}x{im.size[1]}; give a mask of the image's size")
    try:
        m = _flatten_alpha(_to_8bit(m)).convert("L")
    except (ValueError, OSError) as e:
        raise DiffloError(f"cannot read mask {path} (mode {m.mode}) as greyscale ({e}); save it as an 8-bit "
                          f"PNG") from None
    if m.size != (size, size):
        m = m.resize((size, size), Image.NEAREST)
    a = (np.asarray(m) >= 128).astype(np.float32)
    return torch.from_numpy(a)[None, None]


def check_class(c: int, num_classes: int, flag: str = "--class") -> int:
    if num_classes == 0:
        return 0
    if not 0 <= c < num_classes:
        raise DiffloError(f"class index {c} out of range in {flag}: this model has classes 0..{num_classes - 1}")
    return c


def _int_list(s: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise DiffloError(f"{flag} must be comma-separated integers like 1,3,5; got {s!r}") from None


# ----------------------------------------------------------------------------- parser
def add_parser(sub) -> None:
    from .cli import _nonneg_float, _positive_int, _seed

    e = sub.add_parser("edit", help="edit images in the sampling loop (SDEdit, inpainting, anagrams, ...)",
                       description="Image editing with a trained model; class labels are the prompt. "
                                   "See docs/editing.md.")
    tsub = e.add_subparsers(dest="technique", required=True, metavar="TECHNIQUE")

    def common(p, classes=True, times="steps"):
        p.add_argument("--ckpt", required=True, help="run directory, checkpoint directory or .safetensors file")
        p.add_argument("--out", required=True, help="output directory (figure.png, raw.npz, result_XX.png)")
        p.add_argument("--figure", help="also write the figure to this PNG path")
        p.add_argument("--seed", type=_seed, default=0, help="try i uses seed + i (default 0)")
        p.add_argument("--n", type=_positive_int, default=1, help="number of tries (default 1)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--no-ema", dest="ema", action="store_false", default=True, help="use the raw weights")
        if classes:
            p.add_argument("--w", type=_nonneg_float, default=3.0, help="CFG scale in each branch (default 3)")
            p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun", "dpmpp"],
                           help="default ddpm for diffusion, euler for flow")
            p.add_argument("--no-clip", action="store_true", help="do not clamp the predicted x0 to [-1, 1]")
        if times == "steps":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--steps", type=_positive_int, default=50, help="sampling steps (default 50)")
            g.add_argument("--stride", type=_positive_int, help="instead of --steps: timesteps T' , T'-S, ..., 0")
        elif times == "stride":
            p.add_argument("--stride", type=_positive_int, default=30,
                           help="timestep stride: 990, 960, ..., 0 for 30 (default 30)")

    f = tsub.add_parser("forward", help="the forward process at chosen timesteps, as a strip")
    common(f, classes=False, times=None)
    f.add_argument("--image", help="input PNG/JPG (default: a model sample of --class)")
    f.add_argument("--class", dest="cls", type=int, default=0, help="class of the generated input (no --image)")
    f.add_argument("--t", default="250,500,750", help="comma-separated timesteps (default 250,500,750)")

    d = tsub.add_parser("denoise", help="blur vs one-step vs iterative denoising of a noisy image, with PSNR")
    common(d, times="stride")
    d.set_defaults(w=0.0)
    d.add_argument("--image", help="clean input PNG/JPG (default: a model sample of --class)")
    d.add_argument("--class", dest="cls", type=int, default=None,
                   help="class of the generated input, and the condition when --w > 0 (default w 0: unconditional)")
    d.add_argument("--i-start", type=int, default=10,
                   help="index into the strided timesteps of the noise level (default 10: t=690 for stride 30)")

    s = tsub.add_parser("sdedit", help="image-to-image: noise an image to several levels and denoise toward a class")
    common(s, times="stride")
    s.add_argument("--image", required=True, help="input PNG/JPG (hand-drawn or out of domain is fine)")
    s.add_argument("--class", dest="cls", type=int, required=True, help="target class")
    s.add_argument("--levels", default="1,3,5,7,10,20",
                   help="start levels: the number of strided steps from the clean end (default 1,3,5,7,10,20)")

    p = tsub.add_parser("inpaint", help="RePaint: regenerate the white region of a mask")
    common(p)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="mask PNG of the image's size: white (>=128) = regenerate")
    p.add_argument("--class", dest="cls", type=int, required=True)
    p.add_argument("--jump-length", type=_positive_int, default=1, help="RePaint jump length j (default 1)")
    p.add_argument("--jump-n-sample", type=_positive_int, default=1,
                   help="RePaint resampling: run each chunk of j steps r times (default 1: no jumps)")

    a = tsub.add_parser("anagram", help="an image that reads as class A upright and class B in another view")
    common(a)
    a.add_argument("--a", type=int, required=True, help="class seen upright")
    a.add_argument("--b", type=int, required=True, help="class seen in --view")
    a.add_argument("--view", choices=[v for v in editing.VIEWS], default="rot180", help="default rot180")

    h = tsub.add_parser("hybrid", help="low frequencies from class A, high frequencies from class B")
    common(h)
    h.add_argument("--low", type=int, required=True, help="class A (low frequencies, seen from afar)")
    h.add_argument("--high", type=int, required=True, help="class B (high frequencies, seen close up)")
    h.add_argument("--kernel-size", type=_positive_int, default=13, help="Gaussian kernel size, odd (default 13)")
    h.add_argument("--sigma", type=_nonneg_float, default=2.0, help="Gaussian sigma in pixels (default 2)")


# ----------------------------------------------------------------------------- running
class _Ctx:
    def __init__(self, args, model=None, log=print):
        """``model``: an already loaded :class:`~difflo.sample.Model` (``difflo serve``), else ``args.ckpt``
        is loaded; ``log`` receives the lines the command prints."""
        from .sample import load_model, pick_device

        self.args = args
        self.out = Path(args.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DiffloError(f"cannot create --out {self.out}: {e.strerror}") from None
        if args.figure is not None:
            from .cli import _check_out
            _check_out(Path(args.figure), (".png",), "--figure")
        self.model = model or load_model(args.ckpt, ema=args.ema, device=pick_device(args.device))
        self.device = next(self.model.net.parameters()).device
        self.path = self.model.path
        self.C, self.S = self.model.cfg.model.in_channels, self.model.cfg.model.image_size
        self.seeds = [args.seed + i for i in range(args.n)]
        self.notes: list[str] = []
        self.log = log
        sampler = getattr(args, "sampler", None) or ("ddpm" if self.model.objective == "diffusion" else "euler")
        from .samplers import SAMPLERS_FOR
        if sampler not in SAMPLERS_FOR[self.model.objective]:
            raise DiffloError(f"sampler {sampler!r} does not fit this {self.model.objective} model; choose one of "
                              f"{', '.join(SAMPLERS_FOR[self.model.objective])}")
        self.sampler = sampler

    def denoiser(self, w=None):
        from .sample import make_denoiser
        return make_denoiser(self.model, self.args.w if w is None else w, not getattr(self.args, "no_clip", False))

    def times(self):
        a = self.args
        if getattr(a, "stride", None):
            return editing.strided_times(self.path, a.stride)
        if self.model.objective == "diffusion" and a.steps > self.path.T:
            raise DiffloError(f"--steps {a.steps} exceeds the model's {self.path.T} training timesteps")
        ts = self.path.sampling_times(a.steps)
        return [t.item() for t in ts]

    def cls(self, c, flag="--class"):
        return check_class(c, self.model.num_classes, flag)

    def labels(self, *cols):
        return torch.tensor([list(cols)] * len(self.seeds), device=self.device).squeeze(1) if len(cols) == 1 \
            else torch.tensor([list(cols)] * len(self.seeds), device=self.device)

    def input_image(self, image, c):
        if image:
            x = load_image(image, self.C, self.S, self.notes)
        else:
            from .sample import generate
            c = self.cls(0 if c is None else c)
            x = generate(self.model, torch.tensor([c]), [self.args.seed + 10_000], sampler="ddim", steps=50,
                         w=3.0)
            self.notes.append(f"input: a model sample of class {c} (seed {self.args.seed + 10_000})")
        return x.to(self.device)

    def write(self, grid: list[list[torch.Tensor]], row_labels, results: torch.Tensor, raw: dict, summary: str):
        from .images import grid_image, save_image, to_uint8

        ncol = max(len(r) for r in grid)
        cells = []
        blank = torch.ones(1, self.C, self.S, self.S, device="cpu")
        for r in grid:
            cells += [c.reshape(1, self.C, self.S, self.S).cpu() for c in r] + [blank] * (ncol - len(r))
        fig = grid_image(to_uint8(torch.cat(cells)), ncol, row_labels)
        save_image(fig, self.out / "figure.png")
        if self.args.figure:
            Path(self.args.figure).parent.mkdir(parents=True, exist_ok=True)
            save_image(fig, self.args.figure)
        u8 = to_uint8(results.cpu())
        for i, im in enumerate(u8):
            save_image(Image.fromarray(im[:, :, 0] if self.C == 1 else im), self.out / f"result_{i:02d}.png")
        tmp = self.out / ".raw.tmp.npz"
        np.savez_compressed(tmp, **{k: to_uint8(v.cpu()) for k, v in raw.items()}, seeds=np.array(self.seeds))
        tmp.replace(self.out / "raw.npz")
        for n in self.notes:
            self.log(f"note: {n}")
        self.log(summary)
        self.log(f"wrote {self.out / 'figure.png'}, {self.out / 'raw.npz'} and {len(u8)} result PNGs"
                 + (f"; figure also at {self.args.figure}" if self.args.figure else ""))


def _t_label(t):
    return f"t={t}" if isinstance(t, int) else f"t={t:.3g}"


def cmd_forward(ctx: _Ctx) -> int:
    from .samplers import SeededNoise

    a = ctx.args
    try:
        ts = [editing.cli_time(ctx.path, float(v)) for v in a.t.split(",") if v.strip()] if a.t else []
    except ValueError:
        raise DiffloError(f"--t must be comma-separated timesteps like 250,500,750; got {a.t!r}") from None
    if not ts:
        raise DiffloError("--t needs at least one timestep, e.g. 250,500,750")
    x0 = ctx.input_image(a.image, a.cls)
    noise = SeededNoise(ctx.seeds, x0.shape[1:], ctx.device)
    z = noise()                                                   # the same eps at every t (one per try)
    xs = {f"x_{t}": editing.q_sample(x0.expand_as(z), z, *ctx.path.alpha_sigma(t)) for t in ts}
    grid = [[x0[0]] + [xs[f"x_{t}"][i] for t in ts] for i in range(len(ctx.seeds))]
    results = torch.stack([xs[f"x_{t}"] for t in ts], 1).flatten(0, 1)
    ctx.write(grid, [f"seed {s}" for s in ctx.seeds], results, {"clean": x0, **xs},
              "forward: columns clean, " + ", ".join(_t_label(t) for t in ts))
    return 0


def cmd_denoise(ctx: _Ctx) -> int:
    from .samplers import SeededNoise

    a = ctx.args
    ts = editing.strided_times(ctx.path, a.stride)
    if not 0 <= a.i_start < len(ts):
        raise DiffloError(f"--i-start {a.i_start} out of range: stride {a.stride} gives {len(ts)} timesteps "
                          f"(indices 0..{len(ts) - 1})")
    if a.w > 0 and a.cls is None and ctx.model.num_classes:
        raise DiffloError("--w > 0 conditions on a class: give --class")
    t = ts[a.i_start]
    x0 = ctx.input_image(a.image, a.cls)
    c = ctx.cls(a.cls if a.cls is not None else 0)
    den = ctx.denoiser()
    noise = SeededNoise(ctx.seeds, x0.shape[1:], ctx.device)
    B = len(ctx.seeds)
    y = torch.full((B,), c, device=ctx.device)
    x_t = editing.q_sample(x0.expand(B, -1, -1, -1), noise(), *ctx.path.alpha_sigma(t))
    blur = [editing.best_blur(x_t[i:i + 1], x0) for i in range(B)]
    one = den(x_t, t, y=y)
    it = editing._run(ctx.sampler, den, x_t.clone(), ts[a.i_start:], {"y": y}, None, noise)
    grid, lines = [], []
    for i in range(B):
        pb, p1, pi = blur[i][3], editing.psnr(one[i:i + 1], x0), editing.psnr(it[i:i + 1], x0)
        grid.append([x0[0], x_t[i], blur[i][0][0], one[i], it[i]])
        lines.append(f"seed {ctx.seeds[i]}: noisy {editing.psnr(x_t[i:i + 1], x0):.2f} dB, best blur "
                     f"(kernel {blur[i][1]}, sigma {blur[i][2]:g}) {pb:.2f} dB, one-step {p1:.2f} dB, "
                     f"iterative ({len(ts) - a.i_start} steps, {ctx.sampler}) {pi:.2f} dB")
    summary = (f"denoise at {_t_label(t)} (--i-start {a.i_start}, stride {a.stride}); columns: clean, noisy, "
               f"blur, one-step, iterative\n  " + "\n  ".join(lines))
    ctx.write(grid, [f"seed {s}" for s in ctx.seeds], it,
              {"clean": x0, "noisy": x_t, "blur": torch.cat([b[0] for b in blur]), "one_step": one,
               "iterative": it}, summary)
    return 0


def cmd_sdedit(ctx: _Ctx) -> int:
    a = ctx.args
    c = ctx.cls(a.cls)
    ts = editing.strided_times(ctx.path, a.stride)
    levels = _int_list(a.levels, "--levels")
    bad = [k for k in levels if not 0 <= k <= len(ts)]
    if bad or not levels:
        raise DiffloError(f"--levels must lie in 0..{len(ts)} (stride {a.stride} gives {len(ts)} timesteps); got {a.levels}")
    x_in = ctx.input_image(a.image, None)
    den = ctx.denoiser()
    B = len(ctx.seeds)
    y = torch.full((B,), c, device=ctx.device)
    outs = {k: editing.sdedit(den, x_in.expand(B, -1, -1, -1), y, ts, k, ctx.seeds, ctx.sampler) for k in levels}
    grid = [[x_in[0]] + [outs[k][i] for k in levels] for i in range(B)]
    results = torch.stack([outs[k] for k in levels], 1).flatten(0, 1)
    starts = ", ".join(f"{k}: " + ("input" if k == 0 else _t_label(ts[-k])) for k in levels)
    ctx.write(grid, [f"seed {s}" for s in ctx.seeds], results, {"input": x_in, **{f"level_{k}": v for k, v in outs.items()}},
              f"sdedit toward class {c} (w={a.w:g}, {ctx.sampler}); columns: input, then levels ({starts})")
    return 0


def cmd_inpaint(ctx: _Ctx) -> int:
    a = ctx.args
    x = ctx.input_image(a.image, None)
    mask = load_mask(a.mask, a.image, ctx.S).to(ctx.device)
    c = ctx.cls(a.cls)
    ts = ctx.times()
    B = len(ctx.seeds)
    y = torch.full((B,), c, device=ctx.device)
    out = editing.inpaint(ctx.denoiser(), x.expand(B, -1, -1, -1), mask, y, ts, ctx.seeds, ctx.sampler,
                          jump_length=a.jump_length, jump_n_sample=a.jump_n_sample)
    shown = x * (1 - mask) + mask * 0.0                      # the regenerated region shown grey
    grid = [[x[0], shown[0]] + [out[i] for i in range(B)]]
    ctx.write(grid, None, out, {"input": x, "masked": shown, "inpainted": out},
              f"inpaint as class {c} (w={a.w:g}, {ctx.sampler}, {len(ts)} steps, jump length {a.jump_length}, "
              f"{a.jump_n_sample} samples per jump); columns: input, masked (grey = regenerated), tries")
    return 0


def cmd_anagram(ctx: _Ctx) -> int:
    a = ctx.args
    A, B_ = ctx.cls(a.a, "--a"), ctx.cls(a.b, "--b")
    den = editing.AnagramDenoiser(ctx.denoiser(), ["identity", a.view])
    n = len(ctx.seeds)
    y = torch.tensor([[A, B_]] * n, device=ctx.device)
    out = editing.sample_plain(den, y, ctx.times(), ctx.seeds, (ctx.C, ctx.S, ctx.S), ctx.sampler)
    viewed = editing.apply_view(out, a.view)
    grid = [list(out), list(viewed)]
    ctx.write(grid, [f"{A} upright", f"{B_} {a.view}"], out, {"anagram": out, "viewed": viewed},
              f"anagram: class {A} upright, class {B_} under {a.view} (w={a.w:g}, {ctx.sampler}); "
              f"row 1 as generated, row 2 the same images under {a.view}")
    return 0


def cmd_hybrid(ctx: _Ctx) -> int:
    a = ctx.args
    lo, hi = ctx.cls(a.low, "--low"), ctx.cls(a.high, "--high")
    den = editing.HybridDenoiser(ctx.denoiser(), a.kernel_size, a.sigma)
    n = len(ctx.seeds)
    y = torch.tensor([[lo, hi]] * n, device=ctx.device)
    out = editing.sample_plain(den, y, ctx.times(), ctx.seeds, (ctx.C, ctx.S, ctx.S), ctx.sampler)
    low = den.lowpass(out)
    high = (out - low).clamp(-1, 1)
    grid = [list(out), list(low), list(high)]
    ctx.write(grid, ["hybrid", f"lowpass ({lo})", f"highpass ({hi})"], out,
              {"hybrid": out, "lowpass": low, "highpass": high},
              f"hybrid: low frequencies of class {lo}, high of class {hi} (Gaussian kernel {a.kernel_size}, "
              f"sigma {a.sigma:g}; w={a.w:g}, {ctx.sampler})")
    return 0


def run(args, model=None, log=print) -> int:
    ctx = _Ctx(args, model, log)
    return {"forward": cmd_forward, "denoise": cmd_denoise, "sdedit": cmd_sdedit, "inpaint": cmd_inpaint,
            "anagram": cmd_anagram, "hybrid": cmd_hybrid}[args.technique](ctx)


def main(argv=None) -> int:
    """``difflo edit ...`` on its own (``python -m difflo.edit_cli edit ...``), as cli.main wires it."""
    import sys

    from .cli import _Parser

    p = _Parser(prog="difflo")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return run(args)
    except DiffloError as e:
        print(f"difflo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
