"""``difflo experiment schedules``: linear vs cosine vs sigmoid noise schedules.

The schedules (``difflo.schedules``): linear betas (Ho et al. 2020, beta 1e-4 .. 0.02), cosine
alpha_bar (Nichol & Dhariwal 2021, Eq. 17) and sigmoid alpha_bar (Jabri et al. 2022). Shown: alpha_bar_t
and log SNR_t = log(alpha_bar / (1 - alpha_bar)) against t, one digit noised with the same eps at
matched t under each, and the same model trained with each schedule for the same number of steps
(equal training compute), sampled with the same sampler, steps, w and seeds.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from .. import data as data_mod, schedules
from ..images import to_uint8
from ..io import pyplot
from .common import (Options, Report, base_config, class_caption, judge_for, measure, row_labels, sample_grid,
                     short, shown_classes, trained)

SCHEDULES = ("linear", "cosine", "sigmoid")
SHOW_T = (0, 100, 250, 500, 750, 900, 999)


def run(opts: Options, log=print):
    t0 = time.time()
    base = base_config(opts)
    names = opts.extra.get("schedules", SCHEDULES)
    T = base.diffusion.timesteps
    rep = Report(opts.out, "schedules", "Noise schedules: linear vs cosine vs sigmoid")
    rep.setup(opts, base, schedules=", ".join(names), sampler=f"{base.sample.sampler} {opts.eval_steps} steps, "
              f"w={base.sample.w}", prediction=base.diffusion.prediction)

    # 1) The curves.
    abar = {s: schedules.alphas_cumprod(schedules.get_betas(s, T)).numpy() for s in names}
    P = pyplot()
    fig, ax = P.subplots(1, 2, figsize=(10, 3.6))
    t = np.arange(T)
    for s in names:
        ax[0].plot(t, abar[s], label=s)
        ax[1].plot(t, np.log(abar[s] / (1 - abar[s])), label=s)
    ax[0].set(xlabel="t", ylabel="alpha_bar_t", title="signal kept: alpha_bar_t")
    ax[1].set(xlabel="t", ylabel="log SNR_t", title="log SNR_t = log(alpha_bar / (1 - alpha_bar))")
    rep.save_plot(fig, ax, "curves.png", legend=(0, 1))
    rows = [{"schedule": s, **{f"t={k}": float(abar[s][k]) for k in SHOW_T},
             "t_half": int(np.argmin(np.abs(abar[s] - 0.5)))} for s in names]
    rep.text("## 1. alpha_bar and SNR")
    rep.figure("curves.png", "alpha_bar_t and log SNR_t of each schedule (T = %d)" % T)
    rep.table("alpha_bar", rows, [("schedule", "schedule", "")] + [(f"t={k}", f"t={k}", ".4f") for k in SHOW_T]
              + [("t_half", "t where alpha_bar = 0.5", "")], "alpha_bar_t at matched t")

    # 2) The forward process at matched t: one training digit per schedule, the same eps.
    ds = data_mod.from_config(base.data)
    x0, _ = ds.batch([0])                                               # (1, C, H, W)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(opts.seed), dtype=torch.float64)
    strip = []
    for s in names:
        for k in SHOW_T:
            a = float(abar[s][k])
            strip.append((a ** 0.5 * x0.double() + (1 - a) ** 0.5 * eps).float())
    rep.text("## 2. The forward process at matched t")
    rep.save_grid("forward.png", to_uint8(torch.cat(strip)), len(SHOW_T), list(names))
    rep.figure("forward.png", "x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps at t = "
               + ", ".join(map(str, SHOW_T)) + " (columns), the same eps for every schedule (rows)")

    # 3) The same model trained with each schedule.
    judge = judge_for(opts, base, log)
    floor = rep.noise_floor(judge, base, opts.n, seed=opts.seed)
    results, losses = [], {}
    for s in names:
        cfg = copy.deepcopy(base)
        cfg.diffusion.schedule = s
        r = trained(opts, cfg, f"schedule-{s}", log)
        losses[s] = r.loss_curve()
        model = r.model()
        res = measure(model, judge, opts.n, opts.seed, sampler=base.sample.sampler, steps=opts.eval_steps,
                      w=base.sample.w)
        results.append({"schedule": s, **short(res, judge.metric), "train_minutes": r.train_seconds / 60})
        rep.save_grid(f"samples_{s}.png", sample_grid(model, model.num_classes, 8, opts.seed,
                                                      sampler=base.sample.sampler, steps=opts.eval_steps,
                                                      w=base.sample.w), 8, row_labels(model))
        log(f"schedules: {s}: {judge.metric} {res[judge.metric]:.2f}, accuracy {res['class_accuracy']:.3f}")
    fig, ax = P.subplots(figsize=(6, 3.6))
    for s, (st, lo) in losses.items():
        k = max(1, len(lo) // 20)
        smooth = np.convolve(lo, np.ones(k) / k, mode="valid")
        ax.plot(st[k - 1:], smooth, label=s)
    ax.set(xlabel="step", ylabel=f"{base.diffusion.prediction}-prediction MSE (moving average)", yscale="log",
           title="training loss")
    rep.save_plot(fig, ax, "loss.png")
    rep.text(f"## 3. The same model trained with each schedule ({opts.train_steps} steps each)")
    rep.figure("loss.png", "training loss per schedule (the loss scale depends on the schedule: its t-distribution "
               "of SNRs differs, so the curves compare speed of descent, not quality)")
    rep.table("quality", results, [("schedule", "schedule", ""), (judge.metric, judge.metric, ".2f"),
                                   ("class_accuracy", "class accuracy", ".3f"), ("train_minutes", "train min", ".1f"),
                                   ("seconds", "sampling s", ".1f")],
              f"N = {opts.n} samples each, {base.sample.sampler} {opts.eval_steps} steps, w = {base.sample.w}; "
              f"{judge.metric} against {judge.ref['n']} held-out images")
    for s in names:
        rep.figure(f"samples_{s}.png", f"{s} schedule: 8 samples of each of "
                   f"{class_caption(model, shown_classes(model.num_classes))} (rows), same seeds")
    acc = float(np.mean([r["class_accuracy"] for r in results]))     # their standard error's p
    best = min(results, key=lambda r: r[judge.metric])
    spread = max(r[judge.metric] for r in results) - best[judge.metric]
    resolved = spread > 2 * floor["sd"]
    rep.text(f"**Result.** At equal training compute the {best['schedule']} schedule gives the lowest "
             f"{judge.metric} ({best[judge.metric]:.2f}); the spread across schedules ({spread:.2f}) is "
             + ("larger than" if resolved else "within") + f" twice the sd of real-data draws at this N "
             f"({2 * floor['sd']:.2f}), so " + ("the ranking is resolved" if resolved else
                                                "this N does not rank the schedules by distance")
             + "; class accuracies: " + ", ".join(f"{r['schedule']} {r['class_accuracy']:.3f}" for r in results)
             + f" (standard error about {100 * (acc * (1 - acc) / opts.n) ** 0.5:.1f} points at {acc:.2f}).")
    rep.results["quality"] = results
    return rep.write(time.time() - t0)
