"""``difflo experiment failure-modes``: what degrades under low compute, each with a figure.

1. Too few sampler steps: DDIM at 1, 2, 3, 5 steps beside the reference step count.
2. Guidance too strong: w far above the useful range saturates pixels (x0 is clamped to [-1, 1]
   at every step, so overshooting predictions pile up at black and white).
3. No EMA early in training: at the first snapshots, raw weights vs a plain EMA (which still holds
   mostly the initialisation) vs the config's EMA with warmup.
4. Tiny data: the same model trained on k images per class; memorisation is measured as the RMS
   pixel distance from each sample to its nearest training image, against the same distance for
   real held-out images (a copy of a training image has distance 0).
"""
from __future__ import annotations

import copy
import time

import numpy as np

from .. import data as data_mod
from ..eval.memorization import nearest
from .common import (Options, Report, base_config, class_caption, firsts, judge_for, measure, short,
                     shown_classes, trained)

FEW_STEPS = (1, 2, 3, 5)
HIGH_WS = (3.0, 10.0, 20.0, 40.0)
TINY_K = (1, 10)


def saturation(images: np.ndarray) -> float:
    """Fraction of pixels at the ends of the range (0 or 255)."""
    return float(np.mean((images == 0) | (images == 255)))


def run(opts: Options, log=print):
    t0 = time.time()
    cfg = base_config(opts)
    sampler, w, k_ref = cfg.sample.sampler, cfg.sample.w, opts.eval_steps
    rep = Report(opts.out, "failure-modes", "Failure modes under low compute")
    rep.setup(opts, cfg, sampler=f"{sampler}, w={w} unless varied")
    base = trained(opts, cfg, "base", log)
    judge = judge_for(opts, cfg, log)
    rep.noise_floor(judge, cfg, opts.n, seed=opts.seed)
    model = base.model()
    shown = shown_classes(min(model.num_classes, opts.n))      # classes the n balanced samples include
    done: dict[tuple, dict] = {}

    def final(steps: int, gw: float) -> dict:
        """The final base model at (steps, w); parts 1, 2 and 4 share the reference setting, sampled once."""
        if (steps, gw) not in done:
            done[steps, gw] = measure(model, judge, opts.n, opts.seed, sampler=sampler, steps=steps, w=gw)
        return done[steps, gw]

    cols = [(judge.metric, judge.metric, ".2f"), ("class_accuracy", "class accuracy", ".3f")]

    # 1) Too few steps.
    rows, imgs = [], []
    for k in tuple(opts.extra.get("few_steps", FEW_STEPS)) + (k_ref,):
        res = final(k, w)
        rows.append({"steps": k, **short(res, judge.metric)})
        imgs.append(firsts(res, shown))
    rep.text(f"## 1. Too few sampler steps ({sampler}, w = {w})")
    rep.save_grid("few_steps.png", np.concatenate(imgs), len(shown), [f"{r['steps']} steps" for r in rows])
    rep.figure("few_steps.png", f"one sample of each of {class_caption(model, shown)} (columns) at each step count (rows), the same seeds")
    rep.table("few_steps", rows, [("steps", "steps", "")] + cols, f"N = {opts.n} per row")
    worst, ref = rows[0], rows[-1]
    rep.text(f"At {worst['steps']} step the {judge.metric} is {worst[judge.metric]:.2f} against "
             f"{ref[judge.metric]:.2f} at {ref['steps']} steps (accuracy {worst['class_accuracy']:.3f} vs "
             f"{ref['class_accuracy']:.3f}): one step returns the model's first x0 estimate from pure noise, "
             f"an average over the class.")

    # 2) Guidance too strong.
    rows, imgs = [], []
    for gw in opts.extra.get("high_ws", HIGH_WS):
        res = final(k_ref, gw)
        rows.append({"w": gw, **short(res, judge.metric), "saturated": saturation(res["images"]),
                     "mean_pixel": float(res["images"].mean() / 255)})
        imgs.append(firsts(res, shown))
    real = data_mod.load_split(cfg.data, cfg.eval.ref_split)
    real_sat = saturation(real.images[:opts.n])
    rep.text("## 2. Guidance too strong")
    rep.save_grid("high_w.png", np.concatenate(imgs), len(shown), [f"w={r['w']:g}" for r in rows])
    rep.figure("high_w.png", f"one sample of each of {class_caption(model, shown)} (columns) at each w (rows), the same seeds")
    rep.table("high_w", rows, [("w", "w", "g")] + cols + [("saturated", "pixels at 0 or 255", ".3f"),
                                                         ("mean_pixel", "mean pixel", ".3f")],
              f"N = {opts.n} per row; real {cfg.eval.ref_split} images: {real_sat:.3f} of pixels at 0 or 255")
    rep.text(f"From w = {rows[0]['w']:g} to w = {rows[-1]['w']:g} the saturated fraction goes "
             f"{rows[0]['saturated']:.3f} -> {rows[-1]['saturated']:.3f} and the {judge.metric} "
             f"{rows[0][judge.metric]:.2f} -> {rows[-1][judge.metric]:.2f}.")

    # 3) No EMA early in training.
    early = base.steps()[:2]
    rows, imgs, names = [], [], []
    for step in early:
        for wname, label in (("raw", "raw"), ("0.999", "EMA 0.999, no warmup"),
                             ("ema", f"EMA {cfg.train.ema_decay} + warmup")):
            res = measure(base.model(step, wname), judge, opts.n, opts.seed, sampler=sampler, steps=k_ref, w=w)
            rows.append({"step": step, "weights": label, **short(res, judge.metric)})
            imgs.append(firsts(res, shown))
            names.append(f"{step}: {label}")
    rep.text(f"## 3. No EMA early in training (snapshots at steps {', '.join(map(str, early))})")
    rep.save_grid("early_ema.png", np.concatenate(imgs), len(shown), names)
    rep.figure("early_ema.png", f"one sample of each of {class_caption(model, shown)} (columns) per weights (rows), the same seeds")
    rep.table("early_ema", rows, [("step", "step", ""), ("weights", "weights", "")] + cols, f"N = {opts.n} per row")
    first = rows[:3]
    rep.text(f"At step {early[0]}: raw {first[0][judge.metric]:.2f} / {first[0]['class_accuracy']:.3f}, plain EMA "
             f"{first[1][judge.metric]:.2f} / {first[1]['class_accuracy']:.3f}, EMA with warmup "
             f"{first[2][judge.metric]:.2f} / {first[2]['class_accuracy']:.3f} ({judge.metric} / accuracy): an EMA "
             f"without warmup early in training still averages in the random initialisation.")

    # 4) Tiny data per class.
    rows, figs = [], []
    full = data_mod.from_config(cfg.data)
    for k in tuple(opts.extra.get("tiny_k", TINY_K)) + (None,):
        c = copy.deepcopy(cfg)
        c.data.per_class = k
        r = base if k is None else trained(opts, c, f"per-class-{k}", log)
        train_set = full if k is None else data_mod.first_per_class(copy.deepcopy(full), k)
        res = final(k_ref, w) if k is None else measure(r.model(), judge, opts.n, opts.seed, sampler=sampler,
                                                        steps=k_ref, w=w)
        d_s, idx = nearest(res["images"], train_set.images)
        d_r, _ = nearest(real.images[:opts.n], train_set.images)
        rows.append({"per_class": k or f"all ({len(full) // max(1, full.num_classes)})", **short(res, judge.metric),
                     "nn_samples": float(np.median(d_s)), "nn_real": float(np.median(d_r)),
                     "copies": float(np.mean(d_s < 0.5 * np.median(d_r)))})
        if k is not None:
            pick = [np.flatnonzero(res["labels"] == c)[0] for c in shown]
            show = np.stack([res["images"][pick], np.asarray(train_set.images)[idx[pick]]], 1)
            show = show.reshape(-1, *res["images"].shape[1:])
            figs.append(rep.save_grid(f"tiny_{k}.png", show, 10, None))
    rep.text("## 4. Tiny data: k training images per class")
    rep.table("tiny_data", rows, [("per_class", "images per class", "")] + cols + [
        ("nn_samples", "median NN distance, samples", ".3f"), ("nn_real", "median NN distance, real held-out", ".3f"),
        ("copies", "samples closer than half the real NN distance", ".2f")],
        f"N = {opts.n} per row; NN distance: RMS pixel distance (pixels in [0, 1]) to the nearest image of the "
        f"model's own training set")
    for k, f in zip(opts.extra.get("tiny_k", TINY_K), figs):
        rep.figure(f, f"k = {k}: samples (odd columns) beside their nearest training image (even columns), "
                      f"{class_caption(model, shown)}, five per row")
    rep.text(f"With k = {rows[0]['per_class']} the median distance from a sample to its nearest training image is "
             f"{rows[0]['nn_samples']:.3f} against {rows[0]['nn_real']:.3f} for real held-out images "
             f"({rows[0]['copies']:.0%} of samples are near-copies by that measure); with the full data set it is "
             f"{rows[-1]['nn_samples']:.3f} vs {rows[-1]['nn_real']:.3f}.")
    return rep.write(time.time() - t0)
