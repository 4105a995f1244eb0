"""``difflo demo``: train on the embedded mnist10k digits for a few minutes, then a grid and a GIF."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import torch

from .. import config as config_mod, guards
from ..images import grid_image, save_image, to_uint8
from ..model import load_model
from ..train import train
from .argtypes import positive_float
from .sample import run_sampling

DEMO_MINUTES = 5.0


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="train on mnist10k for a few minutes, then sample a grid and a GIF",
                       description="Train the default model on the embedded mnist10k digits for a bounded time, "
                                   "then write a class-conditional grid, a denoising GIF and the loss curve.")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--minutes", type=positive_float, default=DEMO_MINUTES,
                   help=f"training time budget in minutes (default {DEMO_MINUTES:g})")
    d.add_argument("--resume", action="store_true", help="continue a demo run in --out")
    d.set_defaults(func=run)


def busy_note(minutes: float) -> str | None:
    """A note when other processes already load the CPU (1-minute load average above half the cores): the
    demo trains for a fixed time, so it then reaches fewer steps and a weaker model."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return None
    if load <= cores / 2:
        return None
    return (f"note: the CPU is busy (load average {load:.1f} on {cores} cores): the demo trains for {minutes:g} "
            f"minutes, so it will reach fewer steps and weaker digits than on an idle machine; stop the other work "
            f"or give it more time with --minutes")


def run(args) -> int:
    out = Path(args.out)
    cfg = config_mod.Config()                      # the defaults are the mnist10k demo config
    cfg.train.max_minutes = args.minutes
    cfg.train.steps = 100_000                      # bounded by time, not steps
    cfg.train.lr_schedule = "constant"
    print(f"difflo demo: training on the embedded mnist10k digits for {args.minutes:g} minutes ...")
    if note := busy_note(args.minutes):
        print(note, file=sys.stderr)
    with guards.graceful_stop() as stop:
        ckpt = train(cfg, out / "run", resume=args.resume)
    if stop.signum:
        again = shlex.join(["difflo", "demo", "--out", str(out), "--minutes", f"{args.minutes:g}", "--resume"])
        print(guards.stop_message(stop, ckpt, again), file=sys.stderr)
        return stop.exit_code
    model = load_model(ckpt, ema=True)
    labels = torch.arange(10).repeat_interleave(10)
    images = run_sampling(model, labels, list(range(100)), cfg.sample, 100, gif=out / "denoise.gif")
    save_image(grid_image(to_uint8(images), 10, [f"digit {c}" for c in range(10)]), out / "grid.png")
    print(f"trained {ckpt.name.removeprefix('step_')} steps in {args.minutes:g} minutes (the demo is bounded by time, "
          f"so its quality follows this machine's speed and load: README 'What the demo makes')")
    print(f"wrote {out / 'grid.png'} (one row per digit, {cfg.sample.sampler.upper()} {cfg.sample.steps} steps, "
          f"w={cfg.sample.w:g})\n"
          f"wrote {out / 'denoise.gif'} (denoising trajectory: x_t above, predicted x0 below)\n"
          f"wrote {out / 'run' / 'loss.png'} (loss curve) and {out / 'run' / 'metrics.csv'}\n"
          f"checkpoint {ckpt}\n"
          f"sample more with: difflo sample --ckpt {out / 'run'} --out grid.png")
    return 0
