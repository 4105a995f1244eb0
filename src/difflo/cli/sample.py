"""``difflo sample``: a labelled grid (.png) or a sample set (.npz) from a checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffloError
from ..images import grid_image, save_gif, save_image, to_uint8
from ..io import atomic_path, check_out_file
from ..model import load_guide, load_model, pick_device
from ..generate import VARIANCES, SampleSettings, describe, generate, settings_for
from ..precision import PRECISIONS, compile_net
from ..samplers import SAMPLERS, users
from ..schedules import GRID_ENDS, SPACING_CHOICES, STEP_RULES
from .argtypes import CKPT_HELP, add_guidance_flags, add_null_class, nonneg_float, positive_int, seed


def add_parser(sub) -> None:
    s = sub.add_parser("sample", help="sample images from a trained model",
                       description="Sample a labelled grid (.png) or a sample set (.npz) from a checkpoint. The "
                                   "sampler options (--eta, --variance, --s-*) belong to the samplers that read "
                                   "them: one the chosen sampler does not read is an error.")
    s.add_argument("--ckpt", required=True, help=CKPT_HELP)
    add_null_class(s)
    s.add_argument("--sampler", choices=list(SAMPLERS),
                   help="default: the run's sample.sampler (ddpm in configs/mnist10k.yaml, euler for flow)")
    s.add_argument("--steps", type=positive_int, help="sampling steps (default: the run's, 50)")
    s.add_argument("--eta", type=nonneg_float,
                   help=f"{_used_by('eta')}: noise scale eta, 0 deterministic, 1 DDPM-like (default 0)")
    s.add_argument("--w", type=nonneg_float,
                   help="classifier-free guidance scale (0 uncond., 1 cond.; default: the run's sample.w)")
    add_guidance_flags(s, guide=True)
    s.add_argument("--spacing", choices=list(SPACING_CHOICES),
                   help="the time grid: timestep spacing (leading, trailing, linspace) or noise-level spacing "
                        "(karras: Karras et al. 2022 Eq. 5, exponential), which gives fractional timesteps; "
                        "default: the run's sample.spacing")
    s.add_argument("--steps-offset", type=int, metavar="K",
                   help="leading spacing: add K to every timestep (diffusers' steps_offset; default: the run's, 0)")
    s.add_argument("--step-rule", choices=list(STEP_RULES),
                   help="where a step goes: listed, the grid's next timestep; stride, T // steps timesteps down "
                        "(diffusers' DDIMScheduler); default: the run's (stride for a DDIMScheduler folder)")
    s.add_argument("--grid-end", choices=list(GRID_ENDS),
                   help="where the last step goes: clean (the data, alpha_bar = 1) or t0 (timestep 0: diffusers' "
                        "set_alpha_to_one false); default: the run's")
    s.add_argument("--variance", choices=list(VARIANCES), help=f"{_used_by('variance')}: the reverse variance")
    s.add_argument("--s-churn", type=nonneg_float,
                   help=f"{_used_by('s_churn')} (flow): EDM churn S_churn, > 0 makes them stochastic (default 0)")
    s.add_argument("--s-tmin", type=nonneg_float, help="churn only at t >= s_tmin (flow time 0..1; default 0)")
    s.add_argument("--s-tmax", type=nonneg_float, help="churn only at t <= s_tmax (default 1)")
    s.add_argument("--s-noise", type=nonneg_float, help="churn noise scale S_noise (default 1)")
    s.add_argument("--no-clip", action="store_true", help="do not clamp the predicted x0 to [-1, 1]")
    s.add_argument("--precision", choices=list(PRECISIONS),
                   help="the network's precision: auto = bf16 where the hardware has it (default: the run's)")
    n = s.add_mutually_exclusive_group()
    n.add_argument("--grid", type=positive_int, metavar="K", help="K images per class in a grid (default 8)")
    n.add_argument("--n", type=positive_int, help="N images in total (for .npz sample sets)")
    s.add_argument("--classes", default="all",
                   help="comma-separated class indices or names (e.g. 0,3 or plant-flower,face-smiling), or 'all' "
                        "(default)")
    s.add_argument("--seed", type=seed, default=0, help="image i uses seed + i (default 0)")
    s.add_argument("--ema", dest="ema", action="store_true", default=True, help="use EMA weights (default)")
    s.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")
    s.add_argument("--batch-size", type=positive_int, default=250)
    s.add_argument("--device", default="auto")
    s.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for large --n)")
    s.add_argument("--gif", help="also write the denoising trajectory of the first batch as a GIF")
    s.add_argument("--out", required=True, help="grid.png, or samples.npz (images uint8 NxHxWxC, labels)")
    s.set_defaults(func=run)


def _used_by(option: str) -> str:
    return "/".join(users(option))


def run_sampling(model, labels, seeds, settings: SampleSettings, batch_size: int, gif: Path | None = None,
                 guide=None):
    """Generate with a progress bar; optionally record the trajectory of the first batch as a GIF."""
    from tqdm import tqdm

    frames = []
    first = labels[:batch_size].tolist()
    show = [first.index(c) for c in dict.fromkeys(first)][:10]      # one sample per class, at most 10

    def record(d):
        if d["batch"] == 0:      # row 1: x_t, row 2: the predicted x0, one column per class
            frames.append(grid_image(to_uint8(torch.cat([d["x"][show], d["denoised"][show]])), len(show)))

    with tqdm(total=len(labels), unit="img", disable=not sys.stderr.isatty()) as bar:
        images = generate(model, labels, seeds, settings, batch_size=batch_size,
                          callback=record if gif else None, progress=bar, guide=guide)
    if gif:
        save_gif(frames, gif)
    return images


def run(args) -> int:
    out = check_out_file(args.out, (".png", ".npz"))
    gif = check_out_file(args.gif, (".gif",), "--gif") if args.gif else None
    device = pick_device(args.device)
    model = load_model(args.ckpt, ema=args.ema, device=device, null_class=args.null_class)
    if args.compile:
        model.net = compile_net(model.net, device)
    settings = settings_for(model, sampler=args.sampler, steps=args.steps, eta=args.eta, w=args.w,
                            spacing=args.spacing, steps_offset=args.steps_offset, step_rule=args.step_rule,
                            grid_end=args.grid_end, variance=args.variance, clip_x0=False if args.no_clip else None,
                            precision=args.precision, s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax,
                            s_noise=args.s_noise, guidance_interval=args.guidance_interval,
                            guidance_rescale=args.guidance_rescale)
    guide = load_guide(args.guide, model, ema=args.ema, device=device)
    classes = model.parse_classes(args.classes)
    if args.n:
        labels = torch.tensor(classes).repeat(-(-args.n // len(classes)))[:args.n]
    else:
        per_class = args.grid or 8
        labels = torch.tensor(classes).repeat_interleave(per_class)
    seeds = [args.seed + i for i in range(len(labels))]
    t0 = time.time()
    images = run_sampling(model, labels, seeds, settings, args.batch_size, gif, guide)
    dt = time.time() - t0
    u8 = to_uint8(images)
    if out.suffix.lower() == ".npz":
        with atomic_path(out) as tmp:
            np.savez_compressed(tmp, images=u8, labels=labels.numpy().astype(np.int64))
    else:
        ncol = len(labels) // len(classes) if not args.n else min(len(labels), 10)
        rows = [model.class_label(c) for c in classes] if not args.n and model.num_classes else None
        save_image(grid_image(u8, ncol, rows), out)
    print(f"wrote {out}: {len(labels)} images in {dt:.1f}s ({describe(settings)}; "
          f"precision {model.precision(settings.precision)}" + (f"; guide {args.guide}" if guide else "") + ")"
          + (f"; trajectory {gif}" if gif else ""))
    return 0
