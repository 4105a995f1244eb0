"""``difflo experiment recipe``: candidate training recipes compared at the same budget.

A candidate is the base config (``--config``, ``--set``) with its own overrides
(``--candidate "NAME: section.key=value section.key=value"``, repeatable); the base itself is the
candidate ``base``. The budget is one of:

- ``--minutes M``: each candidate is first timed over a short probe (``PROBE_WARMUP`` untimed and
  ``PROBE_STEPS`` timed training steps on this machine) and then trained for the steps it reaches in
  M minutes at that speed, as a fixed step count (its learning-rate decay follows those steps): load
  that arrives later lengthens the wall time but cannot change the result. A probe during which other
  processes used more than ``cpuload.DISTURBED`` of the machine is repeated (``PROBE_TRIES`` times)
  and then refused: a throughput measured beside another job does not compare. Probes are cached per
  machine and config in ``RUNS/recipe-probes.json``, so an interrupted comparison resumes with the
  same step counts.
- ``--train-steps S`` (without ``--minutes``): the same steps for every candidate.

Scoring (the same for every candidate): at ``--evals`` evenly spaced checkpoints of each run, ``--n``
class-balanced samples with seeds ``seed + i``, with the candidate's own sample settings (its
``sample`` section; ``--eval-steps`` sets the step count of all), scored by the data set's judge
(``difflo.eval.periodic.Judge``: a Frechet distance in the classifier's features, or Inception FID/KID
with ``--set eval.features=inception``) against the ``eval.ref_split`` images, beside the
real-vs-real floor at the same N (N training images against the same reference); KID, precision and
recall; class accuracy and, for emoji subcategories, category accuracy. A candidate trained with
``train.posthoc_ema`` is also scored at its last step with the post-hoc EMA of each ``--sigma-rels``
length (``difflo.posthoc_ema``: no retraining). Quality against training minutes (step x the probe's
seconds per step) is the plot; the table ranks candidates by the last checkpoint's distance. Each candidate's
scores are written to ``OUT/progress.json`` as soon as it is scored (a comparison stopped later keeps them);
``results.json`` and ``report.md`` replace it at the end.
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np

from .. import config as config_mod, cpuload, guards, posthoc_ema, precision
from ..errors import DiffloError
from ..eval.classifier import class_categories
from ..io import pyplot, write_text_atomic
from ..train import train
from .common import Options, Report, base_config, judge_for, measure, row_labels, sample_grid, trained

PROBE_WARMUP, PROBE_STEPS, PROBE_TRIES = 2, 8, 3
SIGMA_RELS = (0.05, 0.10, 0.20)
PROGRESS = "progress.json"               # the scores so far, while candidates remain
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_candidate(text: str) -> tuple[str, tuple[str, ...]]:
    """``"NAME: a.b=1 c.d=2"`` -> (NAME, overrides); one-line errors name the fix."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not NAME.match(name):
        raise DiffloError(f"--candidate {text!r}: write NAME: section.key=value ..., e.g. "
                          f"--candidate 'lr2e-3: train.lr=2e-3' (NAME: letters, digits, _ . + -)")
    overrides = tuple(rest.split())
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise DiffloError(f"--candidate {name}: {bad[0]!r} is not section.key=value (separate overrides by spaces)")
    return name, overrides


def candidate_configs(opts: Options) -> dict[str, config_mod.Config]:
    """{name: config} of the base and every candidate (a bad override fails here, before any training)."""
    base = base_config(opts)
    out = {"base": base}
    for name, overrides in opts.extra.get("candidates", ()):
        if name in out:
            raise DiffloError(f"--candidate {name}: the name is used twice (the base config is 'base')")
        cfg = config_mod.apply_overrides(copy.deepcopy(base), list(overrides))
        cfg.validate()
        out[name] = cfg
    return out


# --------------------------------------------------------------------------- the budget
SPEED_KEYS = ("batch_size", "grad_accum", "precision", "compile", "posthoc_ema", "device")


def probe_key(cfg: config_mod.Config) -> str:
    """What a step's speed depends on: the machine, the network, the data's shape, the objective and the
    training options that change the work per step; candidates that differ only in lr, weighting, EMA
    or sampler share one probe (and so train the same steps)."""
    d = cfg.to_dict()
    what = {"model": d["model"], "data": d["data"], "objective": d["diffusion"].get("objective"),
            "train": {k: d["train"].get(k) for k in SPEED_KEYS}}
    h = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{precision.machine_key()}|{h}"


def probe(opts: Options, cfg: config_mod.Config, name: str, log=print, tries: int = PROBE_TRIES) -> dict:
    """{seconds_per_step, images_per_s, other_share} of ``cfg``'s training step on this machine, timed
    over PROBE_STEPS steps in a throwaway run (cached in RUNS/recipe-probes.json)."""
    cache = Path(opts.runs) / "recipe-probes.json"
    key = probe_key(cfg)
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        return known[key]
    for attempt in range(1, tries + 1):
        c = copy.deepcopy(cfg)
        c.train.steps, c.train.max_minutes = PROBE_WARMUP + PROBE_STEPS, None
        c.train.ckpt_every, c.train.log_every, c.train.posthoc_ema = 10 ** 9, 10 ** 9, ()
        c.train.posthoc_every = None
        marks: dict[int, float] = {}
        load = cpuload.OtherLoad()

        def on_step(step, net):
            if step == PROBE_WARMUP:
                load.restart()
            marks[step] = time.perf_counter()

        run_dir = Path(opts.runs) / f".probe-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        train(c, run_dir, progress=False, log=lambda *a, **k: None, on_step=on_step)
        shutil.rmtree(run_dir, ignore_errors=True)
        if guards.stop_requested():                      # a signal: the probe is thrown away, timed again later
            raise guards.Stopped(None)
        share = load.share()
        sec = statistics.median(marks[i + 1] - marks[i] for i in range(PROBE_WARMUP, PROBE_WARMUP + PROBE_STEPS))
        res = {"seconds_per_step": sec, "images_per_s": c.train.batch_size / sec, "other_share": share,
               "machine": precision.machine_key()}
        log(f"recipe: {name}: {sec:.3f} s/step, {res['images_per_s']:.1f} images/s ({cpuload.describe(share)})")
        if share is None or share <= cpuload.DISTURBED:
            known = json.loads(cache.read_text()) if cache.is_file() else {}
            known[key] = res
            write_text_atomic(cache, json.dumps(known, indent=1))
            return res
        log(f"recipe: the probe of {name} was disturbed; timing it again ({attempt}/{tries})")
        time.sleep(5 * attempt)
    raise DiffloError(f"recipe: while timing candidate {name}, {cpuload.describe(share)} in each of {tries} tries: "
                      f"stop the other jobs (see `top`) or compare at equal steps with --train-steps and no --minutes")


def budgeted(opts: Options, configs: dict, log=print) -> dict[str, dict]:
    """Each candidate's steps (and its probe, with --minutes); sets train.steps and the checkpoints."""
    minutes, evals = opts.extra.get("minutes"), opts.extra.get("evals", 3)
    out = {}
    for name, cfg in configs.items():
        p = probe(opts, cfg, name, log) if minutes else {}
        steps = max(1, round(60 * minutes / p["seconds_per_step"])) if minutes else opts.train_steps
        cfg.train.steps = steps
        cfg.train.ckpt_every = max(1, math.ceil(steps / evals))
        cfg.train.keep_checkpoints = evals + 1
        if cfg.train.posthoc_ema and cfg.train.posthoc_every is None:
            cfg.train.posthoc_every = max(1, math.ceil(steps / 8))         # 8 snapshots: a well-posed fit
        cfg.validate()
        out[name] = {"steps": steps, **p}
    return out


# --------------------------------------------------------------------------- scoring
def scored(opts: Options, judge, model, n: int, settings: dict, **extra) -> dict:
    res = measure(model, judge, n, opts.seed, **settings)
    keep = {k: res.get(k) for k in (judge.metric, "kid", "kd_classifier", "prc_precision", "prc_recall",
                                    "class_accuracy", "category_accuracy", "nfe", "seconds") if res.get(k) is not None}
    keep["distance"] = keep.pop(judge.metric)
    return {**extra, **keep}


def posthoc_model(run, sigma_rel: float):
    """The run's last-step model with the post-hoc EMA of ``sigma_rel`` (None: outside what it tracked)."""
    try:
        res = posthoc_ema.reconstruct(run.dir, sigma_rel)
    except DiffloError:
        return None, None
    model = run.model(res["step"], weights="raw")
    model.net.load_state_dict(res["state"])
    return model, res["step"]


def run(opts: Options, log=print):
    t0 = time.time()
    configs = candidate_configs(opts)
    minutes = opts.extra.get("minutes")
    sigma_rels = opts.extra.get("sigma_rels", SIGMA_RELS)
    own_steps = opts.extra.get("own_steps", False)
    rep = Report(opts.out, "recipe", "Training recipes at equal budget")
    budget = budgeted(opts, configs, log)
    base = configs["base"]
    rep.setup(opts, base, train_steps=", ".join(f"{k} {v['steps']}" for k, v in budget.items()), budget=(f"{minutes:g} minutes of this machine per candidate (probed speed -> fixed steps)"
                                  if minutes else f"{opts.train_steps} steps per candidate"),
              machine=precision.machine_key(),
              candidates="; ".join(f"{k}: {' '.join(v) or '(the base config)'}"
                                   for k, v in [("base", ())] + list(opts.extra.get("candidates", ()))),
              evaluation=f"{opts.extra.get('evals', 3)} checkpoints per run, "
                         + ("each candidate's own sample steps" if own_steps else f"{opts.eval_steps} sampler steps"))
    judge = judge_for(opts, base, log)
    floor = rep.noise_floor(judge, base, opts.n, draws=3, seed=opts.seed)

    curves, finals, sweeps = {}, [], []
    so_far = {"floor": floor, "budget": budget, "curves": curves, "final": finals, "posthoc": sweeps}   # grows below
    for name, cfg in configs.items():
        load = cpuload.OtherLoad()
        r = trained(opts, cfg, f"recipe-{name}", log)
        share = load.share() if r.train_seconds and time.time() - load.t0 > 0.5 * r.train_seconds else None
        settings = {"sampler": cfg.sample.sampler, "w": cfg.sample.w,
                    "steps": cfg.sample.steps if own_steps else opts.eval_steps}
        sec = budget[name].get("seconds_per_step") or r.train_seconds / max(1, cfg.train.steps)
        points = []
        for step in r.steps():
            model = r.model(step)
            if judge.categories is None and judge.classifier is not None:
                judge.categories = _categories(model)
            points.append(scored(opts, judge, model, opts.n, settings, step=step, minutes=step * sec / 60))
            log(f"recipe: {name} step {step}: {judge.metric} {points[-1]['distance']:.2f}, "
                f"accuracy {points[-1].get('class_accuracy', float('nan')):.3f}")
        curves[name] = points
        last = points[-1]
        finals.append({"candidate": name, **{k: v for k, v in last.items() if k != "minutes"},
                       "train_steps": cfg.train.steps, "images_per_s": cfg.train.batch_size / sec,
                       "probe_other_share": budget[name].get("other_share"), "train_other_share": share,
                       "train_minutes": r.train_seconds / 60, "weights": f"EMA {cfg.train.ema_decay}"})
        for s in sigma_rels if cfg.train.posthoc_ema else ():
            model, step = posthoc_model(r, s)
            if model is not None:
                sweeps.append(scored(opts, judge, model, opts.n, settings, candidate=name, sigma_rel=s, step=step))
        rep.save_grid(f"samples_{name}.png", sample_grid(r.model(), r.cfg.model.num_classes, 8, opts.seed,
                                                         **settings), 8, row_labels(r.model()))
        write_text_atomic(rep.out / PROGRESS, json.dumps(so_far, indent=1))

    ranked = sorted(finals, key=lambda f: f["distance"])
    m = judge.metric
    rep.text(f"## Candidates at the end of their budget\n\nFloor: {opts.n} real training images score {m} "
             f"{floor['mean']:.2f} +- {floor['sd']:.2f}; each row's ratio to it is `x floor`.")
    for f in ranked:
        f["x_floor"] = f["distance"] / floor["mean"]
    cols = [("candidate", "candidate", ""), ("train_steps", "steps", ""), ("images_per_s", "images/s", ".1f"),
            ("distance", m, ".2f"), ("x_floor", "x floor", ".2f"), ("kid" if "kid" in ranked[0] else "kd_classifier",
                                                                   "KID", ".4f"),
            ("class_accuracy", "class acc", ".3f"), ("category_accuracy", "category acc", ".3f"),
            ("prc_precision", "precision", ".3f"), ("prc_recall", "recall", ".3f"),
            ("train_minutes", "train min (wall)", ".1f"), ("train_other_share", "others' CPU share", ".2f")]
    rep.table("final", ranked, cols, f"N = {opts.n}, seeds {opts.seed}..{opts.seed + opts.n - 1}, ranked by {m}")
    disturbed = [f["candidate"] for f in finals if (f["probe_other_share"] or 0) > cpuload.DISTURBED]
    if disturbed:
        rep.text(f"**Not comparable:** the throughput of {', '.join(disturbed)} was measured while other "
                 f"processes used the CPU.")
    rep.table("curves", [{"candidate": k, **p} for k, pts in curves.items() for p in pts],
              [("candidate", "candidate", ""), ("step", "step", ""), ("minutes", "minutes", ".1f"),
               ("distance", m, ".2f"), ("class_accuracy", "class acc", ".3f")], "quality along training")
    if sweeps:
        rep.text("## Post-hoc EMA length (no retraining)")
        rep.table("posthoc", sweeps, [("candidate", "candidate", ""), ("sigma_rel", "sigma_rel", ""),
                                      ("distance", m, ".2f"), ("class_accuracy", "class acc", ".3f"),
                                      ("category_accuracy", "category acc", ".3f")],
                  "the last step's weights averaged with each EMA length")
    rep.save_plot(*_curve_plot(curves, m), "curves.png", legend=(0,))
    rep.figure("curves.png", f"{m} and class accuracy against training minutes (N = {opts.n} each point)")
    for name in configs:
        rep.figure(f"samples_{name}.png", f"{name}: 8 samples per shown class, same seeds")
    rep.text(f"**Result.** Lowest {m}: {ranked[0]['candidate']} ({ranked[0]['distance']:.2f}, "
             f"{ranked[0]['x_floor']:.2f}x the floor); the floor's sd at this N is {floor['sd']:.2f}.")
    rep.results.update(so_far)
    written = rep.write(time.time() - t0)
    (rep.out / PROGRESS).unlink(missing_ok=True)         # results.json has it all now
    return written


def _categories(model):
    d = model.cfg.data
    try:
        return class_categories(d.name, model.class_names, d.label, d.root, d.styles)
    except DiffloError:
        return None


def _curve_plot(curves: dict, metric: str):
    P = pyplot()
    fig, ax = P.subplots(1, 2, figsize=(10, 3.6))
    for name, pts in curves.items():
        x = [p["minutes"] for p in pts]
        ax[0].plot(x, [p["distance"] for p in pts], "o-", label=name)
        ax[1].plot(x, [p.get("class_accuracy", np.nan) for p in pts], "o-", label=name)
    ax[0].set(xlabel="training minutes (probed speed)", ylabel=metric, title=f"{metric} (lower is better)")
    ax[1].set(xlabel="training minutes (probed speed)", ylabel="class accuracy", title="class accuracy")
    return fig, ax
