"""``difflo study denoiser``: the single-step denoiser study (:mod:`difflo.experiments.denoiser`).

``add_parser(sub)`` adds the ``study`` command to the subparsers of the ``difflo`` parser;
``run(args)`` executes it and returns the exit code. Bad values (``--hidden 0``, a negative sigma,
an unknown part, an unwritable ``--out``) raise ``DiffloError`` (printed as one line, exit 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments.denoiser import PARTS, SIGMAS, StudyOptions, parse_parts, run_study

DEFAULTS = StudyOptions(out=Path("."))
NUMBERS = (("--hidden", "D", int, "UNet hidden width D"),
           ("--epochs", "E", int, "epochs of the denoiser at --train-sigma"),
           ("--batch-size", "B", int, "denoiser batch size"),
           ("--lr", "LR", float, "denoiser Adam learning rate"),
           ("--train-sigma", "SIGMA", float, "noise level the denoiser is trained at"),
           ("--noise-epochs", "E2", int, "epochs of the pure-noise denoiser"),
           ("--flow-steps", "N", int, "training steps of each flow-model run in the lr part"),
           ("--seed", "S", int, "seed of everything"))


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``study`` (with ``denoiser``) to an argparse subparsers object."""
    p = sub.add_parser("study", help="small studies that write figures and a markdown summary",
                       description="Small studies: each trains for a few minutes on a CPU and writes its figures, "
                                   "results.json and summary.md into --out.")
    ssub = p.add_subparsers(dest="study_command", required=True, metavar="{denoiser}")
    d = ssub.add_parser(
        "denoiser", help="a single-step denoising UNet on mnist10k, and an LR-schedule comparison for the flow model",
        description="A small UNet (Conv/BatchNorm/GELU, skip connections, hidden width D) trained to map "
                    "z = x + sigma eps to x (pixels in [0, 1]) on mnist10k. Parts: strip (the noising strip for "
                    f"sigma in {', '.join(f'{s:g}' for s in SIGMAS)}), train (training at --train-sigma: loss "
                    "curve, test digits after epoch 1 and the last), ood (that model at every sigma: figure and "
                    "per-sigma MSE), noise (a UNet trained on pure noise -> digit, beside the training-set mean), "
                    "lr (the class-conditional flow model trained with a constant and an exponentially decaying "
                    "learning rate, AdamW). The defaults take a few minutes on 2 CPU cores.")
    d.add_argument("--out", metavar="DIR", required=True,
                   help="output folder for the figures, results.json and summary.md")
    for flag, metavar, kind, help in NUMBERS:             # each defaults to StudyOptions' value
        default = getattr(DEFAULTS, flag[2:].replace("-", "_"))
        d.add_argument(flag, metavar=metavar, type=kind, default=default, help=f"{help} (default {default:g})")
    d.add_argument("--parts", metavar="LIST", default="all",
                   help=f"comma-separated subset of {','.join(PARTS)} (default all; ood needs train)")
    d.add_argument("--limit", metavar="N", type=int, default=DEFAULTS.limit,
                   help="train on the first N training digits only (default: all 8,000)")
    d.add_argument("--test-images", metavar="N", type=int, default=DEFAULTS.test_images,
                   help=f"test digits for the MSE tables (default {DEFAULTS.test_images}, at most 2,000)")
    d.add_argument("--flow-config", metavar="YAML", help="the flow model's config (default configs/mnist10k-flow.yaml)")
    d.add_argument("--flow-override", action="append", default=[], metavar="key=value",
                   help="extra config override for both flow runs, e.g. model.channels=16 (repeatable)")
    d.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the flow runs' checkpoints (default: deleted once the loss curves are read)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    opts = StudyOptions(out=Path(args.out), hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size,
                        lr=args.lr, train_sigma=args.train_sigma, noise_epochs=args.noise_epochs,
                        flow_steps=args.flow_steps, seed=args.seed, parts=parse_parts(args.parts), limit=args.limit,
                        test_images=args.test_images, flow_config=args.flow_config,
                        flow_overrides=tuple(args.flow_override), keep_checkpoints=args.keep_checkpoints)
    r = run_study(opts)
    print(f"wrote {opts.out}/summary.md, results.json and the figures ({r['timing_s']['total']:.0f} s)")
    return 0
