"""``difflo distill --ckpt TEACHER --method progressive|reflow --out DIR``: a few-step student (difflo.distill)."""
from __future__ import annotations

import sys

from .. import distill as distill_mod, guards
from ..distill import DistillOptions, METHODS, PAIR_SAMPLERS, PROGRESSIVE_DEFAULTS, REFLOW_DEFAULTS, STUDENT_STEPS
from .argtypes import nonneg_float, number_pair, positive_float, positive_int, seed


def add_parser(sub) -> None:
    s = sub.add_parser("distill", help="distil a model into a 1-4 step student (progressive distillation, reflow)",
                       description="Distil a trained model into a few-step student, written as a normal difflo "
                                   "checkpoint whose config records the teacher, method and steps, so `difflo sample "
                                   "--ckpt OUT` samples with the distilled steps. progressive (diffusion models; "
                                   "Salimans & Ho 2022): each round halves the DDIM steps, guidance w distilled in. "
                                   "reflow (flow models; Liu et al. 2023): the teacher's ODE pairs, cached in "
                                   "OUT/pairs.npz, straighten a student sampled with 1, 2 or 4 Euler steps.")
    s.add_argument("--ckpt", required=True,
                   help="the teacher, a difflo-trained model: a run directory, its checkpoints/ or one step folder, a "
                        ".safetensors file, or 'demo' (a diffusers folder is refused: the student is a difflo UNet)")
    s.add_argument("--method", required=True, choices=list(METHODS), help="progressive (diffusion) or reflow (flow)")
    s.add_argument("--out", required=True, help="the student's folder (a run directory)")
    s.add_argument("--resume", action="store_true", help="continue the distillation in --out from its last checkpoint")
    s.add_argument("--w", type=nonneg_float,
                   help="the guidance scale distilled in (default: the teacher's sample.w; the student samples with "
                        "w 1); with --w-range, the student's default w")
    s.add_argument("--lr", type=positive_float, default=DistillOptions.lr,
                   help="AdamW learning rate, annealed linearly to 0 (per round) (default %(default)s)")
    s.add_argument("--batch-size", type=positive_int, help="default: the teacher's train.batch_size")
    s.add_argument("--seed", type=seed, default=DistillOptions.seed,
                   help="the data order, noise and times (and pair i's seed: seed + i) (default %(default)s)")
    s.add_argument("--ckpt-every", type=positive_int, default=DistillOptions.ckpt_every,
                   help="checkpoint every K steps (default %(default)s)")
    s.add_argument("--log-every", type=positive_int, default=DistillOptions.log_every,
                   help="print the loss every K steps (default %(default)s)")
    s.add_argument("--no-ema", dest="ema", action="store_false", help="distil the teacher's raw weights, not its EMA")
    s.add_argument("--device", default="auto")
    p = s.add_argument_group("progressive")
    p.add_argument("--teacher-steps", type=positive_int, metavar="N0",
                   help=f"the teacher's DDIM steps in the first round, a power of two (default "
                        f"{PROGRESSIVE_DEFAULTS['teacher_steps']}; a distilled teacher: its own steps)")
    p.add_argument("--rounds", type=positive_int, metavar="K",
                   help=f"halvings: the student takes N0 / 2^K steps (default {PROGRESSIVE_DEFAULTS['rounds']})")
    p.add_argument("--steps-per-round", type=positive_int, metavar="S",
                   help=f"training steps per round (default {PROGRESSIVE_DEFAULTS['steps_per_round']})")
    p.add_argument("--w-range", type=number_pair, metavar="LO,HI",
                   help="a student that takes w as an input (Meng et al. 2023): each sample's target is guided at its "
                        "own w in [LO, HI], and the student samples at any w there with one network call per step "
                        "(default: a fixed w distilled in)")
    r = s.add_argument_group("reflow")
    r.add_argument("--pairs", type=positive_int, help=f"teacher pairs (default {REFLOW_DEFAULTS['pairs']})")
    r.add_argument("--pair-steps", type=positive_int,
                   help=f"the teacher's ODE steps per pair (default {REFLOW_DEFAULTS['pair_steps']})")
    r.add_argument("--pair-sampler", choices=list(PAIR_SAMPLERS),
                   help=f"the teacher's ODE solver (default {REFLOW_DEFAULTS['pair_sampler']})")
    r.add_argument("--student-steps", type=int, choices=list(STUDENT_STEPS),
                   help=f"the Euler steps the student samples with by default (default "
                        f"{REFLOW_DEFAULTS['student_steps']})")
    r.add_argument("--train-steps", type=positive_int,
                   help=f"training steps on the pairs (default {REFLOW_DEFAULTS['train_steps']})")
    s.set_defaults(func=run)


def run(args) -> int:
    o = DistillOptions(teacher=args.ckpt, method=args.method, w=args.w, lr=args.lr, batch_size=args.batch_size,
                       seed=args.seed, ckpt_every=args.ckpt_every, log_every=args.log_every, ema=args.ema,
                       teacher_steps=args.teacher_steps, rounds=args.rounds, steps_per_round=args.steps_per_round,
                       w_range=args.w_range,
                       pairs=args.pairs, pair_steps=args.pair_steps, pair_sampler=args.pair_sampler,
                       student_steps=args.student_steps, train_steps=args.train_steps)
    with guards.graceful_stop() as stop:
        ckpt = distill_mod.distill(o, args.out, resume=args.resume, device=args.device)
    if stop.signum:
        print(guards.stop_message(stop, ckpt, "the same difflo distill command with --resume"), file=sys.stderr)
        return stop.exit_code
    print(f"done: student {ckpt}\n  sample with: difflo sample --ckpt {args.out} --out {args.out}/grid.png")
    return 0
