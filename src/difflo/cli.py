"""``difflo`` command line: train, sample, demo, data, edit, eval, study, serve.

Every user error (bad config, missing checkpoint, class out of range, unwritable output...) is
printed as one line ``difflo: error: ...`` with exit code 2; never a traceback. SIGINT/SIGTERM
during ``train``/``demo`` training write a checkpoint, print how to resume and exit with 130/143.
"""
from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__, faults
from .argtypes import nonneg_float as _nonneg_float
from .argtypes import positive_float as _positive_float
from .argtypes import positive_int as _positive_int
from .argtypes import seed as _seed
from .errors import DiffloError

DEMO_MINUTES = 5.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``difflo CMD: error: ... (see difflo CMD --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="difflo", description="Train and sample class-conditional diffusion models.")
    p.add_argument("--version", action="version", version=f"difflo {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model. Overrides are dotted key=value pairs, e.g. train.lr=1e-3.")
    t.add_argument("--config", help="YAML config (see configs/); defaults to the mnist10k config")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    s = sub.add_parser("sample", help="sample images from a trained model",
                       description="Sample a labelled grid (.png) or a sample set (.npz) from a checkpoint.")
    s.add_argument("--ckpt", required=True, help="run directory, checkpoint directory or .safetensors file")
    s.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun", "dpmpp"],
                   help="default: the run's sample.sampler (ddim for diffusion, euler for flow)")
    s.add_argument("--steps", type=_positive_int, help="sampling steps (default: the run's, 50)")
    s.add_argument("--eta", type=_nonneg_float, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    s.add_argument("--w", type=_nonneg_float, help="classifier-free guidance scale (0 uncond., 1 cond.; default 3)")
    s.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help="timestep spacing")
    s.add_argument("--variance", choices=["fixed_small", "fixed_large"], help="DDPM variance")
    s.add_argument("--no-clip", action="store_true", help="do not clamp the predicted x0 to [-1, 1]")
    n = s.add_mutually_exclusive_group()
    n.add_argument("--grid", type=_positive_int, metavar="K", help="K images per class in a grid (default 8)")
    n.add_argument("--n", type=_positive_int, help="N images in total (for .npz sample sets)")
    s.add_argument("--classes", default="all", help="comma-separated class indices, or 'all' (default)")
    s.add_argument("--seed", type=_seed, default=0, help="image i uses seed + i (default 0)")
    s.add_argument("--ema", dest="ema", action="store_true", default=True, help="use EMA weights (default)")
    s.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")
    s.add_argument("--batch-size", type=_positive_int, default=250)
    s.add_argument("--device", default="auto")
    s.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for large --n)")
    s.add_argument("--gif", help="also write the denoising trajectory of the first batch as a GIF")
    s.add_argument("--out", required=True, help="grid.png, or samples.npz (images uint8 NxHxWxC, labels)")

    d = sub.add_parser("demo", help="train on mnist10k for a few minutes, then sample a grid and a GIF",
                       description="Train the default model on the embedded mnist10k digits for a bounded time, "
                                   "then write a class-conditional grid, a denoising GIF and the loss curve.")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--minutes", type=_positive_float, default=DEMO_MINUTES,
                   help=f"training time budget in minutes (default {DEMO_MINUTES:g})")
    d.add_argument("--resume", action="store_true", help="continue a demo run in --out")

    from . import edit_cli
    from .data import cli as data_cli
    from .eval import cli as eval_cli
    from .experiments import cli as experiment_cli
    from .serve import server as serve_cli
    from .study import cli as study_cli
    data_cli.add_parser(sub)
    edit_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    experiment_cli.add_parser(sub)
    study_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    return p


def parse_classes(spec: str, num_classes: int) -> list[int]:
    if num_classes == 0:
        return [0]
    if spec == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in spec.split(",") if c.strip() != ""]
    except ValueError:
        raise DiffloError(f"--classes must be 'all' or comma-separated integers like 0,1,2; got {spec!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise DiffloError(f"class index out of range in --classes {spec!r}: this model has classes "
                          f"0..{num_classes - 1}")
    return classes


def _check_out(path: Path, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    if path.suffix.lower() not in suffixes:
        raise DiffloError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise DiffloError(f"{flag} {path} is a directory; give a file name ending in {' or '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DiffloError(f"cannot write {flag} {path}: {e.strerror}") from None
    return path


def cmd_train(args) -> int:
    from . import config as config_mod
    from .train import train

    cfg = config_mod.load(args.config, args.overrides)   # train() validates it once the data is known
    name = Path(args.config).stem if args.config else "mnist10k"
    out = Path(args.out or f"runs/{name}")
    with faults.graceful_stop() as stop:
        ckpt = train(cfg, out, resume=args.resume)
    if stop.signum:
        again = ["difflo", "train"] + (["--config", args.config] if args.config else []) + list(args.overrides)
        print(faults.stop_message(stop, ckpt, shlex.join(again + ["--out", str(out), "--resume"])), file=sys.stderr)
        return stop.exit_code
    if os.environ.get("RANK", "0") == "0":            # torchrun: rank 0 reports
        print(f"done: checkpoint {ckpt}\n  sample with: difflo sample --ckpt {out} --out {out}/grid.png")
    return 0


def run_sampling(model, labels, seeds, settings: dict, batch_size: int, gif: Path | None = None):
    """Generate with a progress bar; optionally record the trajectory of the first batch as a GIF."""
    import torch
    from tqdm import tqdm

    from .images import grid_image, save_gif, to_uint8
    from .sample import generate

    frames = []
    first = labels[:batch_size].tolist()
    show = [first.index(c) for c in dict.fromkeys(first)][:10]      # one sample per class, at most 10

    def record(d):
        if d["batch"] == 0:      # row 1: x_t, row 2: the predicted x0, one column per class
            frames.append(grid_image(to_uint8(torch.cat([d["x"][show], d["denoised"][show]])), len(show)))

    with tqdm(total=len(labels), unit="img", disable=not sys.stderr.isatty()) as bar:
        images = generate(model, labels, seeds, batch_size=batch_size, callback=record if gif else None,
                          progress=bar, **settings)
    if gif:
        save_gif(frames, gif)
    return images


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .images import grid_image, save_image, to_uint8
    from .sample import load_model, pick_device

    out = _check_out(Path(args.out), (".png", ".npz"))
    gif = _check_out(Path(args.gif), (".gif",), "--gif") if args.gif else None
    model = load_model(args.ckpt, ema=args.ema, device=pick_device(args.device))
    if args.compile:
        from .precision import compile_net
        model.net = compile_net(model.net, pick_device(args.device))
    sc = model.cfg.sample
    settings = {"sampler": args.sampler or sc.sampler, "steps": args.steps or sc.steps,
                "eta": sc.eta if args.eta is None else args.eta, "w": sc.w if args.w is None else args.w,
                "spacing": args.spacing or sc.spacing, "clip_x0": sc.clip_x0 and not args.no_clip,
                "variance": args.variance or sc.variance}
    classes = parse_classes(args.classes, model.num_classes)
    if args.n:
        labels = torch.tensor(classes).repeat(-(-args.n // len(classes)))[:args.n]
    else:
        per_class = args.grid or 8
        labels = torch.tensor(classes).repeat_interleave(per_class)
    seeds = [args.seed + i for i in range(len(labels))]
    t0 = time.time()
    images = run_sampling(model, labels, seeds, settings, args.batch_size, gif)
    dt = time.time() - t0
    u8 = to_uint8(images)
    if out.suffix.lower() == ".npz":
        tmp = out.with_name(f".{out.name}.tmp.npz")
        np.savez_compressed(tmp, images=u8, labels=labels.numpy().astype(np.int64))
        tmp.replace(out)
    else:
        ncol = len(labels) // len(classes) if not args.n else min(len(labels), 10)
        rows = [f"class {c}" for c in classes] if not args.n and model.num_classes else None
        save_image(grid_image(u8, ncol, rows), out)
    desc = ", ".join(f"{k}={v}" for k, v in settings.items())
    print(f"wrote {out}: {len(labels)} images in {dt:.1f}s ({desc})" + (f"; trajectory {gif}" if gif else ""))
    return 0


def cmd_demo(args) -> int:
    from . import config as config_mod
    from .images import grid_image, save_image, to_uint8
    from .sample import load_model
    from .train import train

    out = Path(args.out)
    cfg = config_mod.Config()                      # the defaults are the mnist10k demo config
    cfg.train.max_minutes = args.minutes
    cfg.train.steps = 100_000                      # bounded by time, not steps
    cfg.train.lr_schedule = "constant"
    print(f"difflo demo: training on the embedded mnist10k digits for {args.minutes:g} minutes ...")
    with faults.graceful_stop() as stop:
        ckpt = train(cfg, out / "run", resume=args.resume)
    if stop.signum:
        again = shlex.join(["difflo", "demo", "--out", str(out), "--minutes", f"{args.minutes:g}", "--resume"])
        print(faults.stop_message(stop, ckpt, again), file=sys.stderr)
        return stop.exit_code
    model = load_model(ckpt, ema=True)
    import torch
    labels = torch.arange(10).repeat_interleave(10)
    settings = {"sampler": "ddim", "steps": 50, "eta": 0.0, "w": 3.0, "spacing": "trailing", "clip_x0": True}
    images = run_sampling(model, labels, list(range(100)), settings, 100, gif=out / "denoise.gif")
    save_image(grid_image(to_uint8(images), 10, [f"digit {c}" for c in range(10)]), out / "grid.png")
    print(f"wrote {out / 'grid.png'} (one row per digit, DDIM 50 steps, w=3)\n"
          f"wrote {out / 'denoise.gif'} (denoising trajectory: x_t above, predicted x0 below)\n"
          f"wrote {out / 'run' / 'loss.png'} (loss curve) and {out / 'run' / 'metrics.csv'}\n"
          f"checkpoint {ckpt}\n"
          f"sample more with: difflo sample --ckpt {out / 'run'} --out grid.png")
    return 0


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            from .data import cli as data_cli
            return data_cli.run(args)
        if args.command == "edit":
            from . import edit_cli
            return edit_cli.run(args)
        if args.command == "eval":
            from .eval import cli as eval_cli
            return eval_cli.run(args)
        if args.command == "experiment":
            from .experiments import cli as experiment_cli
            return experiment_cli.run(args)
        if args.command == "study":
            from .study import cli as study_cli
            return study_cli.run(args)
        if args.command == "serve":
            from .serve import server as serve_cli
            return serve_cli.run(args)
        return {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo}[args.command](args)
    except DiffloError as e:
        print(f"difflo: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:                     # the disk filled up or became read-only mid-run
        if e.errno not in DISK_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"difflo: error: {e.strerror}{where}; free disk space or fix the permissions, then run again "
              f"(difflo train: with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
