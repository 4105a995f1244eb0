"""``difflo experiment ema``: raw weights vs exponential moving averages, along training.

EMA of the weights (Polyak & Juditsky 1992; used by DDPM, Ho et al. 2020, decay 0.9999):
theta_ema <- d theta_ema + (1 - d) theta after every step. Compared at every snapshot step of one
run: the raw weights, the config's EMA (decay with warmup min(d, (1 + k) / (10 + k))), and plain
EMAs (no warmup) at ``EMA_DECAYS``, all sampled with the same sampler, w and seeds.
"""
from __future__ import annotations

import time

from ..io import pyplot
from .common import EMA_DECAYS, Options, Report, base_config, judge_for, measure, short, trained


def run(opts: Options, log=print):
    t0 = time.time()
    cfg = base_config(opts)
    rep = Report(opts.out, "ema", "EMA: raw weights vs moving averages along training")
    weights = ["raw", "ema"] + [str(d) for d in EMA_DECAYS]
    names = {"raw": "raw", "ema": f"EMA {cfg.train.ema_decay} + warmup (config)",
             **{str(d): f"EMA {d}" for d in EMA_DECAYS}}
    rep.setup(opts, cfg, weights=", ".join(names.values()),
              sampler=f"{cfg.sample.sampler} {opts.eval_steps} steps, w={cfg.sample.w}")
    r = trained(opts, cfg, "base", log)
    judge = judge_for(opts, cfg, log)
    rep.noise_floor(judge, cfg, opts.n, seed=opts.seed)
    rows = []
    for step in r.steps():
        for wname in weights:
            res = measure(r.model(step, wname), judge, opts.n, opts.seed, sampler=cfg.sample.sampler,
                          steps=opts.eval_steps, w=cfg.sample.w)
            rows.append({"step": step, "weights": names[wname], **short(res, judge.metric)})
            log(f"ema: step {step} {names[wname]}: {judge.metric} {res[judge.metric]:.2f}, "
                f"accuracy {res['class_accuracy']:.3f}")
    P = pyplot()
    fig, ax = P.subplots(1, 2, figsize=(10, 3.6))
    for wname in weights:
        pts = [x for x in rows if x["weights"] == names[wname]]
        ax[0].plot([x["step"] for x in pts], [x[judge.metric] for x in pts], "o-", label=names[wname])
        ax[1].plot([x["step"] for x in pts], [x["class_accuracy"] for x in pts], "o-", label=names[wname])
    ax[0].set(xlabel="training step", ylabel=judge.metric, yscale="log", title=f"{judge.metric} (lower is better)")
    ax[1].set(xlabel="training step", ylabel="class accuracy", title="class accuracy", ylim=(0, 1.02))
    rep.save_plot(fig, ax, "ema.png")
    rep.figure("ema.png", f"quality vs training step, N = {opts.n} samples per point")
    rep.table("ema", rows, [("step", "step", ""), ("weights", "weights", ""), (judge.metric, judge.metric, ".2f"),
                            ("class_accuracy", "class accuracy", ".3f")])
    last = [x for x in rows if x["step"] == rows[-1]["step"]]
    best = min(last, key=lambda x: x[judge.metric])
    first = [x for x in rows if x["step"] == rows[0]["step"]]
    raw_last = next(x for x in last if x["weights"] == "raw")
    slow = next(x for x in first if x["weights"] == names[str(max(EMA_DECAYS))])
    rep.text(f"**Result.** At the last step ({rows[-1]['step']}) the best weights are {best['weights']} "
             f"({judge.metric} {best[judge.metric]:.2f}, accuracy {best['class_accuracy']:.3f}) against raw "
             f"{raw_last[judge.metric]:.2f} / {raw_last['class_accuracy']:.3f}. Early (step {rows[0]['step']}) the "
             f"slowest average, EMA {max(EMA_DECAYS)} without warmup, is still mostly the random initialisation "
             f"({judge.metric} {slow[judge.metric]:.2f}, accuracy {slow['class_accuracy']:.3f}): a decay d averages "
             f"over about 1 / (1 - d) steps.")
    return rep.write(time.time() - t0)
