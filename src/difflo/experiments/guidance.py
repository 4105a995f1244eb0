"""``difflo experiment guidance``: the classifier-free guidance scale w, fidelity vs diversity.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6 in difflo's convention):
x0_hat = x0_uncond + w (x0_cond - x0_uncond); w = 0 is the unconditional model, w = 1 the
conditional one without guidance. Measured per w on the same seeds: class accuracy (fidelity to the
label), the Frechet distance to held-out data (which rises when diversity collapses), the per-class
pixel variance across samples (diversity directly), and precision and recall (Kynkaanniemi et al.
2019, k = 3, in the judge's features against as many held-out images: precision is the share of
samples inside the real data's manifold estimate, recall the share of real images inside the samples'
one), the fidelity/diversity trade-off as two numbers.
"""
from __future__ import annotations

import time

from .. import data as data_mod
from ..io import pyplot
from .common import (Options, Report, base_config, class_caption, class_variance, judge_for, measure,
                     row_labels, sample_grid, short, shown_classes, trained)

WS = (0.0, 1.0, 2.0, 3.0, 5.0, 7.0)


def run(opts: Options, log=print):
    t0 = time.time()
    cfg = base_config(opts)
    ws = opts.extra.get("ws", WS)
    rep = Report(opts.out, "guidance", "Guidance scale: class accuracy vs diversity")
    rep.setup(opts, cfg, ws=", ".join(f"{w:g}" for w in ws), sampler=f"{cfg.sample.sampler} {opts.eval_steps} steps")
    r = trained(opts, cfg, "base", log)
    model = r.model()
    judge = judge_for(opts, cfg, log)
    rep.noise_floor(judge, cfg, opts.n, seed=opts.seed)
    real = data_mod.load_split(cfg.data, cfg.eval.ref_split)
    real_var = class_variance(real.images, real.labels)
    rows = []
    for w in ws:
        res = measure(model, judge, opts.n, opts.seed, sampler=cfg.sample.sampler, steps=opts.eval_steps, w=w)
        var = class_variance(res["images"], res["labels"])
        rows.append({"w": w, **short(res, judge.metric), "class_variance": var,
                     "prc_precision": res["prc_precision"], "prc_recall": res["prc_recall"]})
        prc_n = res["prc_n_gen"]
        rep.save_grid(f"grid_w{w:g}.png", sample_grid(model, model.num_classes, 6, opts.seed,
                                                      sampler=cfg.sample.sampler, steps=opts.eval_steps, w=w), 6,
                      row_labels(model))
        log(f"guidance: w={w:g}: {judge.metric} {res[judge.metric]:.2f}, accuracy {res['class_accuracy']:.3f}, "
            f"per-class variance {var:.4f}, precision {res['prc_precision']:.3f}, recall {res['prc_recall']:.3f}")
    P = pyplot()
    fig, ax = P.subplots(1, 3, figsize=(15, 3.8))
    ax[0].plot([r_[judge.metric] for r_ in rows], [r_["class_accuracy"] for r_ in rows], "o-")
    for r_ in rows:
        ax[0].annotate(f"w={r_['w']:g}", (r_[judge.metric], r_["class_accuracy"]), textcoords="offset points",
                       xytext=(4, -10), fontsize=8)
    ax[0].set(xlabel=f"{judge.metric} (lower: closer to the data)", ylabel="class accuracy",
              title="the trade-off curve")
    ax[1].plot([r_["w"] for r_ in rows], [r_["class_variance"] for r_ in rows], "o-", label="samples")
    ax[1].axhline(real_var, color="gray", ls="--", label=f"real {cfg.eval.ref_split} images")
    ax[1].set(xlabel="guidance scale w", ylabel="per-class pixel variance", title="diversity within a class")
    ax[2].plot([r_["prc_recall"] for r_ in rows], [r_["prc_precision"] for r_ in rows], "o-")
    for r_ in rows:
        ax[2].annotate(f"w={r_['w']:g}", (r_["prc_recall"], r_["prc_precision"]), textcoords="offset points",
                       xytext=(4, -10), fontsize=8)
    ax[2].set(xlabel="recall (real images covered: diversity)", ylabel="precision (samples inside the data: fidelity)",
              title="precision vs recall (k = 3)")
    rep.save_plot(fig, ax, "tradeoff.png", legend=(1,))
    rep.figure("tradeoff.png", f"class accuracy vs {judge.metric} per w, per-class pixel variance per w, and "
               f"precision vs recall per w (N = {opts.n} each)")
    rep.table("guidance", rows, [("w", "w", "g"), ("class_accuracy", "class accuracy", ".3f"),
                                 (judge.metric, judge.metric, ".2f"), ("class_variance", "per-class variance", ".4f"),
                                 ("prc_precision", "precision", ".3f"), ("prc_recall", "recall", ".3f")],
              f"N = {opts.n} per w, the same seeds; real {cfg.eval.ref_split} images' per-class variance: "
              f"{real_var:.4f}; precision and recall with k = 3 in {judge.extractor.name} features, "
              f"{prc_n} samples against as many {cfg.eval.ref_split} images")
    for w in ws:
        rep.figure(f"grid_w{w:g}.png", f"w = {w:g}: 6 samples of each of {class_caption(model, shown_classes(model.num_classes))} "
                                         f"(rows), the same seeds for every w")
    best_fd = min(rows, key=lambda x: x[judge.metric])
    best_acc = max(rows, key=lambda x: x["class_accuracy"])
    rep.text(f"**Result.** Class accuracy goes from {rows[0]['class_accuracy']:.3f} at w = {rows[0]['w']:g} to "
             f"{rows[-1]['class_accuracy']:.3f} at w = {rows[-1]['w']:g} (best {best_acc['class_accuracy']:.3f} at "
             f"w = {best_acc['w']:g}); " + (
                 f"per-class variance goes from {rows[0]['class_variance']:.4f} to {rows[-1]['class_variance']:.4f} "
                 f"(real data {real_var:.4f})" if rows[0]["class_variance"] == rows[0]["class_variance"] else
                 f"per-class variance needs two samples of a class (N = {opts.n} has fewer per class)")
             + f"; the {judge.metric} is lowest at "
             f"w = {best_fd['w']:g} ({best_fd[judge.metric]:.2f}). Precision goes from {rows[0]['prc_precision']:.3f} "
             f"to {rows[-1]['prc_precision']:.3f} and recall from {rows[0]['prc_recall']:.3f} to "
             f"{rows[-1]['prc_recall']:.3f} over the same range of w.")
    rep.results["real_class_variance"] = real_var
    return rep.write(time.time() - t0)
