"""``difflo edit TECHNIQUE``: forward, denoise, sdedit, inpaint, anagram, hybrid, invert, interpolate
(see docs/editing.md).

Each technique writes into ``--out DIR``: ``figure.png`` (a labelled grid), ``raw.npz`` (every image
as uint8 (N, H, W, C), by name) and one PNG per final result (``result_XX.png``). This module only
parses arguments and files; the techniques are :mod:`difflo.edit.techniques`'s functions, which the web page
calls too.

Input images (PNG/JPG) are converted to the model's channels (L for 1 channel, RGB for 3; an alpha
channel is composited on black), resized to the model's image size (the command says so) and scaled
to [-1, 1]. A mask is white (>= 128) where the image is regenerated; it must have the image's size.
Timesteps are the model's own (0..T-1) for diffusion; for flow models the same per-mille scale
(``--t 500`` is t = 0.5).
"""
from __future__ import annotations

from pathlib import Path

from ..edit import techniques
from ..edit.operators import VIEWS
from ..errors import DiffloError
from ..images import load_image, load_mask, parse_colour
from ..io import check_out_file
from ..model import Model, load_model, pick_device
from ..precision import PRECISIONS
from ..samplers import SAMPLERS
from .argtypes import CKPT_HELP, add_null_class, int_list, nonneg_float, positive_int, seed


def add_parser(sub) -> None:
    e = sub.add_parser("edit", help="edit images in the sampling loop (SDEdit, inpainting, anagrams, ...)",
                       description="Image editing with a trained model; class labels are the prompt. "
                                   "See docs/editing.md.")
    tsub = e.add_subparsers(dest="technique", required=True, metavar="TECHNIQUE")

    def common(p, classes=True, times="steps", tries=True, sampler=True, w=3.0):
        p.add_argument("--ckpt", required=True, help=CKPT_HELP)
        add_null_class(p)
        p.add_argument("--out", required=True, help="output directory (figure.png, raw.npz, result_XX.png)")
        p.add_argument("--figure", help="also write the figure to this PNG path")
        if tries:
            p.add_argument("--seed", type=seed, default=0, help="try i uses seed + i (default 0)")
            p.add_argument("--n", type=positive_int, default=1, help="number of tries (default 1)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--precision", choices=list(PRECISIONS),
                       help="the network's precision (default: the run's sample.precision, auto)")
        p.add_argument("--no-ema", dest="ema", action="store_false", default=True, help="use the raw weights")
        if classes:
            p.add_argument("--w", type=nonneg_float, default=w, help=f"CFG scale in each branch (default {w:g})")
            if sampler:
                p.add_argument("--sampler", choices=list(SAMPLERS), help="default ddpm for diffusion, euler for flow")
            p.add_argument("--no-clip", action="store_true", help="do not clamp the predicted x0 to [-1, 1]")
        if times == "steps":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--steps", type=positive_int, default=50, help="sampling steps (default 50)")
            g.add_argument("--stride", type=positive_int, help="instead of --steps: timesteps T' , T'-S, ..., 0")
        elif times == "stride":
            p.add_argument("--stride", type=positive_int, default=30,
                           help="timestep stride: 990, 960, ..., 0 for 30 (default 30)")

    f = tsub.add_parser("forward", help="the forward process at chosen timesteps, as a strip")
    common(f, classes=False, times=None)
    f.add_argument("--image", help="input PNG/JPG (default: a model sample of --class)")
    f.add_argument("--class", dest="cls", default="0", help="class (index or name) of the generated input (no --image)")
    f.add_argument("--t", default="250,500,750", help="comma-separated timesteps (default 250,500,750)")

    d = tsub.add_parser("denoise", help="blur vs one-step vs iterative denoising of a noisy image, with PSNR")
    common(d, times="stride", w=0.0)
    d.add_argument("--image", help="clean input PNG/JPG (default: a model sample of --class)")
    d.add_argument("--class", dest="cls", default=None,
                   help="class of the generated input, and the condition when --w > 0 (default w 0: unconditional)")
    d.add_argument("--i-start", type=int, default=10,
                   help="index into the strided timesteps of the noise level (default 10: t=690 for stride 30)")

    s = tsub.add_parser("sdedit", help="image-to-image: noise an image to several levels and denoise toward a class")
    common(s, times="stride")
    s.add_argument("--image", required=True, help="input PNG/JPG (hand-drawn or out of domain is fine)")
    s.add_argument("--class", dest="cls", required=True, help="target class (index or name)")
    s.add_argument("--levels", default="1,3,5,7,10,20",
                   help="start levels: the number of strided steps from the clean end (default 1,3,5,7,10,20)")

    p = tsub.add_parser("inpaint", help="RePaint: regenerate the white region of a mask")
    common(p)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="mask PNG of the image's size: white (>=128) = regenerate")
    p.add_argument("--class", dest="cls", required=True, help="class (index or name) to fill in with")
    p.add_argument("--jump-length", type=positive_int, default=1, help="RePaint jump length j (default 1)")
    p.add_argument("--jump-n-sample", type=positive_int, default=1,
                   help="RePaint resampling: run each chunk of j steps r times (default 1: no jumps)")

    a = tsub.add_parser("anagram", help="an image that reads as class A upright and class B in another view")
    common(a)
    a.add_argument("--a", required=True, help="class seen upright (index or name)")
    a.add_argument("--b", required=True, help="class seen in --view (index or name)")
    a.add_argument("--view", choices=[v for v in VIEWS], default="rot180", help="default rot180")

    h = tsub.add_parser("hybrid", help="low frequencies from class A, high frequencies from class B")
    common(h)
    h.add_argument("--low", required=True, help="class A (low frequencies, seen from afar; index or name)")
    h.add_argument("--high", required=True, help="class B (high frequencies, seen close up; index or name)")
    h.add_argument("--kernel-size", type=positive_int, default=13, help="Gaussian kernel size, odd (default 13)")
    h.add_argument("--sigma", type=nonneg_float, default=2.0, help="Gaussian sigma in pixels (default 2)")

    i = tsub.add_parser("invert", help="DDIM inversion: an image to its noise and back, with the PSNR per step count")
    common(i, tries=False, sampler=False, times=None, w=1.0)
    i.add_argument("--image", required=True, help="input PNG/JPG")
    i.add_argument("--class", dest="cls", required=True, help="class (index or name) to invert and sample back with")
    i.add_argument("--steps", default="50",
                   help="comma-separated step counts, one inversion each (e.g. 10,20,50; default 50)")
    i.add_argument("--seed", type=seed, default=0, help="seed of the random-noise baseline (default 0)")

    t = tsub.add_parser("interpolate", help="frames between two noises (slerp) and two classes (embedding mix)")
    common(t, tries=False, sampler=False, times=None, w=1.0)
    for side in ("a", "b"):
        g = t.add_mutually_exclusive_group(required=True)
        g.add_argument(f"--image-{side}", help=f"end {side.upper()}: an image PNG/JPG, DDIM-inverted to its noise")
        g.add_argument(f"--seed-{side}", type=seed, help=f"end {side.upper()}: this seed's noise (as difflo sample --seed)")
    t.add_argument("--class-a", help="class (index or name) at end A (default: --class-b; neither: unconditional)")
    t.add_argument("--class-b", help="class at end B (default: --class-a); the embedding is mixed linearly between")
    t.add_argument("--frames", type=positive_int, default=8, help="number of frames, ends included (default 8)")
    t.add_argument("--steps", type=positive_int, default=50, help="DDIM (flow: Euler) steps (default 50)")
    e.set_defaults(func=run)


def _grid(model: Model, a) -> list:
    return techniques.time_grid(model, steps=a.steps, stride=a.stride)


def _image(model: Model, a, c, notes: list):
    """The --image file as the model sees it, or a model sample of class c."""
    device = model.device
    if a.image:
        return load_image(a.image, model.cfg.model.in_channels, model.cfg.model.image_size, notes,
                          background=parse_colour(model.cfg.data.background)).to(device)
    return techniques.sample_input(model, c, a.seed, notes, _precision(model, a)).to(device)


def _precision(model: Model, a) -> str:
    return a.precision or model.cfg.sample.precision


def run_technique(a, model: Model) -> techniques.EditResult:
    """Run the technique ``a`` names (parsed ``difflo edit`` arguments) on a loaded model."""
    notes: list[str] = []
    seeds = [getattr(a, "seed", 0) + i for i in range(getattr(a, "n", 1))]
    for key, flag in (("cls", "--class"), ("a", "--a"), ("b", "--b"), ("low", "--low"), ("high", "--high"),
                      ("class_a", "--class-a"), ("class_b", "--class-b")):
        if getattr(a, key, None) is not None:                  # class names or indices -> indices
            setattr(a, key, model.class_index(getattr(a, key), flag))
    if a.technique == "forward":
        values = []
        if a.t:
            try:
                values = [float(v) for v in a.t.split(",") if v.strip()]
            except ValueError:
                raise DiffloError(f"--t must be comma-separated timesteps like 250,500,750; got {a.t!r}") from None
        ts = techniques.cli_times(model, values)
        if not ts:
            raise DiffloError("--t needs at least one timestep, e.g. 250,500,750")
        return techniques.forward(model, _image(model, a, a.cls, notes), ts, seeds, notes)
    sampler = getattr(a, "sampler", None) or (techniques.ode_sampler(model) if a.technique in ("invert", "interpolate")
                                               else techniques.default_sampler(model))
    opts = techniques.EditOptions(seeds, sampler, a.w, not a.no_clip, _precision(model, a)).check(model)
    if a.technique == "invert":
        steps = int_list(a.steps, "--steps")
        return techniques.invert(model, opts, _image(model, a, None, notes), a.cls, steps, notes)
    if a.technique == "interpolate":
        ends = [load_image(img, model.cfg.model.in_channels, model.cfg.model.image_size, notes,
                           background=parse_colour(model.cfg.data.background)).to(model.device)
                if img is not None else s for img, s in ((a.image_a, a.seed_a), (a.image_b, a.seed_b))]
        return techniques.interpolate(model, opts, ends[0], ends[1], a.class_a, a.class_b, a.frames,
                                techniques.time_grid(model, steps=a.steps), notes)
    if a.technique == "denoise":
        if a.w > 0 and a.cls is None and model.num_classes:
            raise DiffloError("--w > 0 conditions on a class: give --class")
        return techniques.denoise(model, opts, _image(model, a, a.cls, notes), 0 if a.cls is None else a.cls,
                            a.stride, a.i_start, notes)
    if a.technique == "sdedit":
        levels = int_list(a.levels, "--levels")
        return techniques.sdedit(model, opts, _image(model, a, None, notes), a.cls, a.stride, levels, notes)
    if a.technique == "inpaint":
        x = _image(model, a, None, notes)
        mask = load_mask(a.mask, a.image, model.cfg.model.image_size).to(x.device)
        return techniques.inpaint(model, opts, x, mask, a.cls, _grid(model, a), a.jump_length, a.jump_n_sample, notes)
    if a.technique == "anagram":
        return techniques.anagram(model, opts, a.a, a.b, a.view, _grid(model, a))
    return techniques.hybrid(model, opts, a.low, a.high, a.kernel_size, a.sigma, _grid(model, a))


def run(args) -> int:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffloError(f"cannot create --out {out}: {e.strerror}") from None
    if args.figure is not None:
        check_out_file(args.figure, (".png",), "--figure")
    model = load_model(args.ckpt, ema=args.ema, device=pick_device(args.device), null_class=args.null_class)
    for line in run_technique(args, model).write(out, args.figure):
        print(line)
    return 0
