"""``difflo experiment scarcity``: failure modes under per-class data scarcity, on the data set's own
class sizes (Flowers-102 has 40 to 258 images per class, emoji's subcategories 2 to ~900).

One trained model draws k samples of every class (the same seeds). Classes are grouped by their
number of training images (``BINS``) and, per group:

* **class accuracy** of the samples (the data set's classifier, itself trained on the same scarce
  classes: its held-out accuracy on them is lower too, so read the scarce rows as an upper bound of
  what is wrong);
* **diversity**: the mean pairwise RMS pixel distance between the k samples of a class, divided by the
  same for the class's training images (mode collapse: a ratio well below 1);
* **memorisation**: each sample's RMS pixel distance (pixels in [0, 1]) to the nearest training image
  of its class, against the same distance for the class's held-out images; a sample closer than half
  the held-out median is counted a copy (a copy of a training image has distance 0).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .. import data as data_mod
from ..eval.memorization import nearest
from ..images import to_uint8
from ..io import pyplot
from ..generate import generate, settings_for
from .common import Options, Report, base_config, judge_for, trained

BINS = ((1, 10), (11, 30), (31, 100), (101, None))     # training images per class, inclusive
REAL_CAP = 64                                           # training images per class used for diversity


def pairwise_rms(images: np.ndarray) -> float:
    """Mean RMS pixel distance (pixels in [0, 1]) over all pairs of images; nan for fewer than 2."""
    if len(images) < 2:
        return float("nan")
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    d2 = (x ** 2).sum(1)[:, None] + (x ** 2).sum(1)[None, :] - 2 * x @ x.T
    iu = np.triu_indices(len(x), 1)
    return float(np.sqrt(np.maximum(d2[iu], 0) / x.shape[1]).mean())


def bin_of(count: int) -> str:
    for lo, hi in BINS:
        if count >= lo and (hi is None or count <= hi):
            return f"{lo}-{hi}" if hi is not None else f"{lo}+"
    return "0"


def per_class_rows(images, labels, per_class_acc, train, held) -> list[dict]:
    """One row per class: training count, accuracy, diversity ratio, nearest-neighbour distances."""
    rng = np.random.default_rng(0)
    rows = []
    for c in np.unique(labels):
        mine = images[labels == c]
        own = np.flatnonzero(train.labels == c)
        if len(own) == 0:
            continue
        own_images = np.asarray(train.images[own])              # read once: the class's training images
        real = own_images[np.sort(rng.choice(len(own), min(len(own), REAL_CAP), replace=False))]
        d_s, _ = nearest(mine, own_images)
        held_c = np.flatnonzero(held.labels == c)
        d_h = nearest(np.asarray(held.images[held_c]), own_images)[0] if len(held_c) else np.array([])
        div_real = pairwise_rms(real)
        rows.append({"class": int(c), "train_images": int(len(own)), "group": bin_of(len(own)),
                     "accuracy": per_class_acc.get(int(c), float("nan")),
                     "diversity": pairwise_rms(mine), "diversity_real": div_real,
                     "nn_samples": float(np.median(d_s)), "nn_heldout": float(np.median(d_h)) if len(d_h) else None,
                     "copies": float(np.mean(d_s < 0.5 * np.median(d_h))) if len(d_h) else None})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per group: means over its classes (copies: the fraction of its samples)."""
    out = []
    for lo, hi in BINS:
        g = [r for r in rows if r["group"] == bin_of(lo)]
        if not g:
            continue
        ratio = [r["diversity"] / r["diversity_real"] for r in g if r["diversity_real"] > 0]
        held = [r for r in g if r["nn_heldout"] is not None]
        out.append({"group": bin_of(lo), "classes": len(g), "train_images": sum(r["train_images"] for r in g),
                    "accuracy": float(np.mean([r["accuracy"] for r in g])),
                    "diversity_ratio": float(np.median(ratio)) if ratio else None,
                    "nn_samples": float(np.median([r["nn_samples"] for r in g])),
                    "nn_heldout": float(np.median([r["nn_heldout"] for r in held])) if held else None,
                    "copies": float(np.mean([r["copies"] for r in held])) if held else None})
    return out


def run(opts: Options, log=print):
    t0 = time.time()
    cfg = base_config(opts)
    rep = Report(opts.out, "scarcity", "Per-class data scarcity: accuracy, mode collapse and copies")
    base = trained(opts, cfg, "base", log)
    model = base.model()
    C = max(model.num_classes, 1)
    k = max(4, math.ceil(opts.n / C))
    s = settings_for(model, sampler=cfg.sample.sampler, steps=opts.eval_steps, w=cfg.sample.w)
    rep.setup(opts, cfg, samples_per_class=k, sampler=f"{cfg.sample.sampler} {opts.eval_steps} steps, w={cfg.sample.w}",
              groups="training images per class: " + ", ".join(bin_of(lo) for lo, _ in BINS))
    judge = judge_for(opts, cfg, log)
    rep.noise_floor(judge, cfg, C * k, seed=opts.seed)          # at the number of samples drawn here
    rep.text("Per class: **class accuracy** of its samples (the data set's classifier, itself trained on the "
             "same scarce classes: read the scarce rows as an upper bound of what is wrong); **diversity**: the "
             "mean pairwise RMS pixel distance between its samples over the same for its training images (mode "
             "collapse: well below 1); **memorisation**: each sample's RMS distance to the nearest training image "
             "of its class against the same for the class's held-out images (a copy has distance 0).")
    train_set = data_mod.load_split(cfg.data, cfg.data.split)
    held = data_mod.load_split(cfg.data, cfg.eval.ref_split)

    labels = torch.arange(C).repeat_interleave(k)
    t1 = time.perf_counter()
    images = to_uint8(generate(model, labels, [opts.seed + i for i in range(len(labels))], s))
    log(f"scarcity: {len(labels)} samples in {time.perf_counter() - t1:.0f} s")
    res = judge.score(images, labels.numpy())
    rows = per_class_rows(images, labels.numpy(), res.get("per_class", {}), train_set, held)
    groups = summarize(rows)
    rep.table("groups", groups, [
        ("group", "training images per class", ""), ("classes", "classes", ""), ("accuracy", "class accuracy", ".3f"),
        ("diversity_ratio", "diversity: samples / training images (median)", ".2f"),
        ("nn_samples", "NN distance, samples", ".3f"), ("nn_heldout", "NN distance, held-out", ".3f"),
        ("copies", "near-copies", ".2f")],
        f"{k} samples per class ({len(labels)} in all), the same seeds; NN distance: median RMS pixel distance to "
        f"the nearest training image of the same class; near-copies: samples closer than half the class's held-out "
        f"median")
    rep.results["classes"] = rows

    counts = np.array([r["train_images"] for r in rows])
    P = pyplot()
    fig, ax = P.subplots(1, 2, figsize=(10, 3.8))
    ax[0].scatter(counts, [r["accuracy"] for r in rows], s=12)
    ax[0].set(xscale="log", xlabel="training images of the class", ylabel="class accuracy of its samples",
              title="does the model draw the class?", ylim=(-0.02, 1.02))
    ratio = [r["diversity"] / r["diversity_real"] if r["diversity_real"] > 0 else np.nan for r in rows]
    ax[1].scatter(counts, ratio, s=12)
    ax[1].axhline(1.0, color="gray", ls="--")
    ax[1].set(xscale="log", xlabel="training images of the class", ylabel="sample / real pairwise distance",
              title="diversity within the class")
    rep.save_plot(fig, ax, "per_class.png", legend=())
    rep.figure("per_class.png", "one point per class: accuracy and diversity ratio against the class's training size")

    order = sorted(rows, key=lambda r: r["train_images"])
    show = order[:6] + order[-2:]
    cells, names = [], []
    for r in show:
        c = r["class"]
        own = np.flatnonzero(train_set.labels == c)[:k]
        real = np.asarray(train_set.images[own])
        pad = np.full((k - len(real), *images.shape[1:]), 255, np.uint8)
        cells.append(np.concatenate([images[labels.numpy() == c], real, pad]))
        names.append(f"{model.class_label(c)} ({r['train_images']})")
    rep.save_grid("scarce.png", np.concatenate(cells), 2 * k, names)
    rep.figure("scarce.png", f"the six scarcest classes and the two largest (training images in brackets): "
                             f"{k} samples, then up to {k} of the class's training images (blank: it has fewer)")

    first, last = groups[0], groups[-1]
    text = (f"**Result.** All {len(labels)} samples: {judge.metric} {res[judge.metric]:.2f}, class accuracy "
            f"{res['class_accuracy']:.3f}. Classes with {first['group']} training images ({first['classes']} classes): class "
            f"accuracy {first['accuracy']:.3f}, diversity ratio {_num(first['diversity_ratio'])}, near-copies "
            f"{_num(first['copies'])}; classes with {last['group']} ({last['classes']}): {last['accuracy']:.3f}, "
            f"{_num(last['diversity_ratio'])}, {_num(last['copies'])}.")
    rep.text(text)
    return rep.write(time.time() - t0)


def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
