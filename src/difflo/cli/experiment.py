"""``difflo experiment NAME``: each classic comparison as one command that trains (or reuses) the
models it needs, measures, and writes ``DIR/report.md`` with its tables, figures and raw numbers.

``difflo experiment all --out DIR`` runs every experiment into ``DIR/<name>/`` and combines the
reports into one (``--report``, default ``DIR/report.md``); ``difflo experiment report DIR... --out
FILE`` combines existing ones again. Bad values raise ``DiffloError`` (one line, exit 2).
SIGINT/SIGTERM during a model's training finish its step, write its checkpoint (and EMA copies) and exit
130/143 with the command to run again: the same command resumes that model (``difflo.guards``).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

from .. import guards
from ..errors import DiffloError
from ..io import write_text_atomic
from ..experiments import ema, failure, guidance, recipe, scarcity, schedules, steps
from ..experiments.common import Options
from ..samplers import SAMPLERS
from ..schedules import SCHEDULES, SIGMA_SPACINGS, SPACINGS
from .argtypes import positive_float, positive_int, seed

EXPERIMENTS = {"schedules": "linear vs cosine vs sigmoid: curves, forward process, the same model trained with each",
               "ema": "raw vs EMA weights at several decays, evaluated along training",
               "steps": "DDPM, DDIM (eta 0/1), DPM-Solver++ and flow Euler/Heun: quality vs NFE and wall time",
               "guidance": "CFG scale w: class accuracy vs diversity, a grid per w",
               "failure-modes": "too few steps, w too high, no EMA early, tiny data per class",
               "scarcity": "the data set's own scarce classes: accuracy, mode collapse and copies by class size"}
HARNESS = {"recipe": "candidate configs trained for the same budget (--candidate, --minutes), scored with the same "
                     "seeds: distance with its floor, KID, class/category accuracy, precision/recall, curves vs minutes"}
DEFAULTS = Options(out=Path("."))


def _floats(s: str) -> tuple[float, ...]:
    try:
        v = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,1,3, got {s!r}") from None
    if not v or not all(math.isfinite(x) and x >= 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0 like 0,1,3, got {s!r}")
    return v


def _candidate(s: str):
    try:
        return recipe.parse_candidate(s)
    except DiffloError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--candidate {s!r}: ")) from None


def _ints(s: str) -> tuple[int, ...]:
    v = _floats(s)
    if any(x != int(x) or x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 10,20,50, got {s!r}")
    return tuple(int(x) for x in v)


def add_parser(sub):
    p = sub.add_parser("experiment", help="experiments that train, measure and write a report",
                       description="Each experiment trains (or reuses, from --runs) the models it needs, samples "
                                   "them with fixed seeds, scores the samples (Frechet distance in the data set "
                                   "classifier's features, or Inception FID with --set eval.features=inception; "
                                   "class accuracy) and writes DIR/report.md, results.json and one CSV per table. "
                                   "Experiments: " + "; ".join(f"{k}: {v}" for k, v in {**EXPERIMENTS, **HARNESS}.items()) + ".")
    p.add_argument("name", choices=[*EXPERIMENTS, *HARNESS, "all", "report"], metavar="NAME",
                   help=f"{', '.join(EXPERIMENTS)}, all (those into DIR/<name>), recipe (the recipe harness), or "
                        f"report (combine existing experiment folders)")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="report: the experiment folders to combine")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (report: the combined markdown file)")
    p.add_argument("--report", metavar="FILE", help="all: where the combined report goes (default DIR/report.md)")
    p.add_argument("--config", metavar="YAML", help="the base config (default: difflo's defaults, the mnist10k "
                                                    "demo model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.channels=16 (repeatable)")
    p.add_argument("--runs", metavar="DIR", help="cache of trained models, shared by experiments "
                                                 "(default runs/experiment-models)")
    p.add_argument("--train-steps", type=positive_int, default=DEFAULTS.train_steps,
                   help=f"training steps of every model trained (default {DEFAULTS.train_steps})")
    p.add_argument("--snapshots", type=positive_int, default=DEFAULTS.snapshots,
                   help=f"checkpoints kept along each training run, for the EMA curves (default {DEFAULTS.snapshots})")
    p.add_argument("--n", type=positive_int, default=DEFAULTS.n,
                   help=f"samples per measured setting, class-balanced (default {DEFAULTS.n})")
    p.add_argument("--eval-steps", type=positive_int,
                   help=f"sampler steps where steps are not varied (default {DEFAULTS.eval_steps}; recipe: each "
                        f"candidate's sample.steps)")
    p.add_argument("--seed", type=seed, default=0, help="sample i uses seed + i (default 0)")
    p.add_argument("--device", default="auto")
    g = p.add_argument_group("experiment-specific lists (comma-separated)")
    g.add_argument("--ws", type=_floats, help="guidance: the scales (default 0,1,2,3,5,7)")
    g.add_argument("--ddim-steps", type=_ints, help="steps: DDIM step counts (default 10,20,50,100,200)")
    g.add_argument("--dpmpp-steps", type=_ints, help="steps: DPM-Solver++ step counts (default 10,15,20)")
    g.add_argument("--ddim-etas", type=_floats, help="steps: the DDIM etas (default 0,1)")
    g.add_argument("--samplers", help=f"steps: only these samplers (default all; {', '.join(SAMPLERS)})")
    g.add_argument("--other-steps", type=_ints, help="steps: step counts of the samplers without their own list "
                                                     "(default 10)")
    g.add_argument("--spacing", choices=SPACINGS + SIGMA_SPACINGS,
                   help="steps: the diffusion model's time grid for every setting (default: the config's)")
    g.add_argument("--ddpm-steps", type=positive_int, help="steps: DDPM steps (default: the model's T)")
    g.add_argument("--no-flow", action="store_true", help="steps: skip the flow model (Euler/Heun)")
    g.add_argument("--schedules", help="schedules: which (default linear,cosine,sigmoid)")
    g.add_argument("--per-class", type=_ints, help="failure-modes: images per class of the tiny-data models "
                                                   "(default 1,10)")
    g.add_argument("--few-steps", type=_ints, help="failure-modes: the too-few step counts (default 1,2,3,5)")
    g.add_argument("--high-ws", type=_floats, help="failure-modes: the guidance scales (default 3,10,20,40)")
    r = p.add_argument_group("recipe (the harness)")
    r.add_argument("--candidate", dest="candidates", action="append", type=_candidate, metavar="'NAME: K=V ...'",
                   help="a candidate: the base config with these overrides (repeatable; the base is candidate 'base')")
    r.add_argument("--minutes", type=positive_float, help="budget: each candidate trains the steps it reaches in this "
                                                          "many minutes on this machine (probed idle speed); without "
                                                          "it, --train-steps for all")
    r.add_argument("--evals", type=positive_int, help="evaluated checkpoints per candidate, evenly spaced (default 3)")
    r.add_argument("--sigma-rels", type=_floats, help="post-hoc EMA lengths scored for candidates trained with "
                                                      "train.posthoc_ema (default 0.05,0.1,0.2)")
    p.set_defaults(func=run)
    return p


def options(args, out: Path) -> Options:
    extra = {k: v for k, v in {"ws": args.ws, "ddim_steps": args.ddim_steps, "dpmpp_steps": args.dpmpp_steps,
                               "ddim_etas": args.ddim_etas, "samplers": _names(args.samplers, SAMPLERS, "--samplers"),
                               "other_steps": args.other_steps, "spacing": args.spacing,
                               "ddpm_steps": args.ddpm_steps, "no_flow": args.no_flow or None,
                               "tiny_k": args.per_class, "few_steps": args.few_steps, "high_ws": args.high_ws,
                               "schedules": _schedules(args.schedules),
                               "candidates": args.candidates, "minutes": args.minutes, "evals": args.evals,
                               "sigma_rels": args.sigma_rels}.items() if v is not None}
    given = [f for f, v in (("--candidate", args.candidates), ("--minutes", args.minutes), ("--evals", args.evals),
                            ("--sigma-rels", args.sigma_rels)) if v is not None]
    if given and args.name != "recipe":
        raise DiffloError(f"{given[0]} is an option of `difflo experiment recipe`, not of {args.name}")
    if args.name == "recipe":
        extra["own_steps"] = args.eval_steps is None
    return Options(out=out, config=args.config, overrides=tuple(args.overrides),
                   runs=Path(args.runs) if args.runs else DEFAULTS.runs, train_steps=args.train_steps,
                   snapshots=args.snapshots, n=args.n, eval_steps=args.eval_steps or DEFAULTS.eval_steps,
                   seed=args.seed,
                   device=args.device, progress=os.isatty(2), extra=extra)


def _names(s: str | None, known, flag: str):
    """A comma-separated list of names from ``known`` (None: not given)."""
    if s is None:
        return None
    names = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise DiffloError(f"{flag} {s!r}: choose from {', '.join(known)}")
    return names


def _schedules(s: str | None):
    return _names(s, SCHEDULES, "--schedules")


def run_one(name: str, opts: Options) -> Path:
    module = {"schedules": schedules, "ema": ema, "steps": steps, "guidance": guidance, "failure-modes": failure,
              "scarcity": scarcity, "recipe": recipe}
    return module[name].run(opts)


def run(args) -> int:
    with guards.graceful_stop() as stop:
        try:
            return run_experiments(args)
        except guards.Stopped as e:
            print(guards.stop_message(stop, e.ckpt, "the same `difflo experiment` command (it continues that model)"),
                  file=sys.stderr)
            return stop.exit_code


def run_experiments(args) -> int:
    if args.n < 2:
        raise DiffloError("--n must be >= 2 (a Frechet distance needs a covariance)")
    if args.name == "report":
        if not args.dirs:
            raise DiffloError("experiment report: name the experiment folders to combine, e.g. "
                              "`difflo experiment report out/schedules out/ema --out report.md`")
        path = combine([Path(d) for d in args.dirs], Path(args.out))
        print(f"wrote {path}")
        return 0
    if args.dirs:
        raise DiffloError(f"unexpected arguments {' '.join(args.dirs)}: folders are only for `experiment report`")
    out = Path(args.out)
    if args.name == "all":
        t0 = time.time()
        done = [run_one(name, options(args, out / name)).parent for name in EXPERIMENTS]
        path = combine(done, Path(args.report) if args.report else out / "report.md")
        print(f"wrote {path} ({(time.time() - t0) / 60:.1f} min)")
        return 0
    path = run_one(args.name, options(args, out))
    print(f"wrote {path}")
    return 0


def combine(dirs: list[Path], out: Path) -> Path:
    """One markdown file from experiment folders: headings one level down, figure links rewritten
    relative to ``out``'s folder."""
    parts, toc = [], []
    for d in dirs:
        md = d / "report.md"
        if not md.is_file():
            raise DiffloError(f"{md} not found: run `difflo experiment NAME --out {d}` first")
        text = md.read_text()
        rel = Path(os.path.relpath(d.resolve(), out.resolve().parent))
        text = re.sub(r"\]\((?!https?:)([^)]+)\)", lambda m: f"]({(rel / m.group(1)).as_posix()})", text)
        text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
        title = text.splitlines()[0].lstrip("# ").strip()
        toc.append(f"- [{title}](#{_anchor(title)})")
        parts.append(text)
    header = ("# difflo experiments: report\n\nEach section below is written by `difflo experiment NAME` "
              "(tables and figures from its own run; raw numbers beside each section's figures in results.json and "
              "CSV files). Regenerate with the commands in the README.\n\n" + "\n".join(toc) + "\n")
    if out.is_dir():
        raise DiffloError(f"--out {out} is a folder; give the markdown file to write, e.g. {out / 'report.md'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, header + "\n" + "\n".join(parts))
    except OSError as e:
        raise DiffloError(f"cannot write {out}: {e.strerror}; choose another --out") from None
    return out


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
