"""``difflo edit TECHNIQUE``: forward, denoise, sdedit, inpaint, anagram, hybrid, invert, interpolate
(see docs/editing.md).

Each technique writes into ``--out DIR``: ``figure.png`` (a labelled grid), ``raw.npz`` (every image
as uint8 (N, H, W, C), by name) and one PNG per final result (``result_XX.png``). This module is a loop
over :data:`difflo.edit.registry.TECHNIQUES` (each technique's flags, and its ``run``), which the web page
reads too; it adds only the front end's --ckpt, --null-class, --out and --figure, and loads the model.

Input images (PNG/JPG) are converted to the model's channels (L for 1 channel, RGB for 3; an alpha
channel is composited on black), resized to the model's image size (the command says so) and scaled
to [-1, 1]. A mask is white (>= 128) where the image is regenerated; it must have the image's size.
Timesteps are the model's own (0..T-1) for diffusion; for flow models the same per-mille scale
(``--t 500`` is t = 0.5).
"""
from __future__ import annotations

from pathlib import Path

from ..edit import techniques
from ..edit.registry import OneOf, TECHNIQUES
from ..errors import DiffloError
from ..io import check_out_file
from ..model import Model, load_model, pick_device
from . import argtypes
from .argtypes import CKPT_HELP, add_null_class


def add_parser(sub) -> None:
    e = sub.add_parser("edit", help="edit images in the sampling loop (SDEdit, inpainting, anagrams, ...)",
                       description="Image editing with a trained model; class labels are the prompt. "
                                   "See docs/editing.md.")
    tsub = e.add_subparsers(dest="technique", required=True, metavar="TECHNIQUE")
    for t in TECHNIQUES.values():
        p = tsub.add_parser(t.name, help=t.help)
        p.add_argument("--ckpt", required=True, help=CKPT_HELP)
        add_null_class(p)
        p.add_argument("--out", required=True, help="output directory (figure.png, raw.npz, result_XX.png)")
        p.add_argument("--figure", help="also write the figure to this PNG path")
        for item in t.all_flags():
            group = p.add_mutually_exclusive_group(required=item.required) if isinstance(item, OneOf) else p
            for flag in item.flags if isinstance(item, OneOf) else (item,):
                kw = flag.kwargs()
                if isinstance(kw.get("type"), str):                 # a validator named by the library
                    kw["type"] = getattr(argtypes, kw["type"])
                group.add_argument(flag.name, **kw)
    e.set_defaults(func=run)


def run_technique(a, model: Model) -> techniques.EditResult:
    """Run the technique ``a`` names (parsed ``difflo edit`` arguments) on a loaded model."""
    return TECHNIQUES[a.technique].run(model, a)


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
