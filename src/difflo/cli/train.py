"""``difflo train``: train a model from a YAML config with dotted overrides."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .. import config as config_mod, guards
from ..train import train


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model. Overrides are dotted key=value pairs, e.g. train.lr=1e-3.")
    t.add_argument("--config", help="YAML config (see configs/); defaults to the mnist10k config")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=run)


def run(args) -> int:
    cfg = config_mod.load(args.config, args.overrides)   # train() validates it once the data is known
    name = Path(args.config).stem if args.config else "mnist10k"
    out = Path(args.out or f"runs/{name}")
    with guards.graceful_stop() as stop:
        ckpt = train(cfg, out, resume=args.resume)
    if stop.signum:
        again = ["difflo", "train"] + (["--config", args.config] if args.config else []) + list(args.overrides)
        print(guards.stop_message(stop, ckpt, shlex.join(again + ["--out", str(out), "--resume"])), file=sys.stderr)
        return stop.exit_code
    if os.environ.get("RANK", "0") == "0":            # torchrun: rank 0 reports
        print(f"done: checkpoint {ckpt}\n  sample with: difflo sample --ckpt {out} --out {out}/grid.png")
    return 0
