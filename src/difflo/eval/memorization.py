"""Memorisation check: how close are a model's samples to its training images, class by class?

For generated samples of class c, the distance to the nearest training image of class c and to the
nearest training image of any class, against the same statistic for held-out real images of c
(the real-vs-real baseline: how far a *new* real image of c lies from the training images of c).
A model that copies its training images gives samples far closer than held-out reals; scarce
classes (a few training images: emoji's ``animal-amphibian`` has 2) are where that shows first.

Distance: per-pixel RMS on the [0, 1] scale, ``sqrt(mean((a - b)^2))`` over H x W x C (0 for an
exact copy, 1 between black and white images). A sample counts as a *copy* when its nearest
training image (any class) is at most ``threshold`` away; the default threshold is the 5th
percentile of the training images' own nearest-neighbour distances (each to the nearest *other*
training image), so about 5% of training images are that close to another one.

Used by ``difflo eval nearest``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .. import data as data_mod
from ..errors import DiffloError
from ..generate import generate, settings_for
from ..images import grid_image, to_uint8

SCARCE = 10          # default classes: those with at most this many training images


def _flat(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, D) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).reshape(len(images), -1).float() / 255.0


def rms_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel RMS distance on the [0, 1] scale between paired uint8 images (N, H, W, C) -> (N,)."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) / 255.0
    return np.sqrt((d.reshape(len(d), -1) ** 2).mean(1))


def nearest(queries: np.ndarray, refs: np.ndarray, exclude: np.ndarray | None = None,
            batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query's nearest reference image (uint8 (N, H, W, C) and (M, H, W, C)).

    ``exclude[i]``: a reference index query i may not match (itself, for a set against itself; -1:
    none). The search uses |a|^2 + |b|^2 - 2ab in float32; the reported distance is recomputed
    exactly for the chosen neighbour (0 for an exact copy)."""
    if len(refs) == 0:
        raise DiffloError("no reference images to compare with")
    if queries.shape[1:] != refs.shape[1:]:
        raise DiffloError(f"images of different shapes: {queries.shape[1:]} vs {refs.shape[1:]}")
    if exclude is not None and len(refs) == 1 and (np.asarray(exclude) == 0).any():
        raise DiffloError("a set of one image has no nearest *other* image")
    r = _flat(refs)
    r2 = (r * r).sum(1)
    idx = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), batch_size):
        q = _flat(queries[start:start + batch_size])
        d2 = (q * q).sum(1, keepdim=True) + r2[None] - 2 * q @ r.T              # (B, M)
        if exclude is not None:
            ex = torch.as_tensor(np.asarray(exclude[start:start + batch_size]), dtype=torch.long)
            rows = torch.nonzero(ex >= 0).flatten()
            d2[rows, ex[rows]] = float("inf")
        idx[start:start + len(q)] = d2.argmin(1).numpy()
    return rms_distance(queries, refs[idx]), idx


def copy_threshold(images: np.ndarray, percentile: float = 5.0, max_queries: int = 1000, seed: int = 0) -> float:
    """The ``percentile`` of the images' distances to their nearest *other* image (a seeded subset of
    at most ``max_queries`` images is measured, against all)."""
    if len(images) < 2:
        raise DiffloError("a copy threshold needs at least 2 training images")
    q = np.arange(len(images))
    if len(q) > max_queries:
        q = np.sort(np.random.default_rng(seed).choice(len(images), max_queries, replace=False))
    dist, _ = nearest(images[q], images, exclude=q)
    return float(np.percentile(dist, percentile))


def _median(x) -> float | None:
    return float(np.median(x)) if len(x) else None


def class_rows(samples: np.ndarray, sample_labels: np.ndarray, train, held_out, classes, threshold: float,
               pool: np.ndarray | None = None) -> tuple[list[dict], dict]:
    """Per class c of ``classes``: the samples' nearest-neighbour distances to the training images of c
    and of all classes (``pool``: the indices of ``train`` searched for "all classes"; default all),
    the held-out reals' distances to the training images of c, and the fraction of samples at most
    ``threshold`` from a training image. Also returns, per class, the same-class nearest training
    image of each sample (for a grid): ``{c: uint8 (n, H, W, C)}``."""
    names = train.classes or tuple(str(c) for c in range(max(train.num_classes, 1)))
    pool = np.arange(len(train)) if pool is None else np.asarray(pool)
    rows, neighbours = [], {}
    for c in classes:
        own = np.flatnonzero(train.labels == c)
        mine = samples[sample_labels == c]
        if len(own) == 0:
            raise DiffloError(f"class {names[c]!r} has no training images to compare with")
        d_same, i_same = nearest(mine, train.images[own])
        refs = np.union1d(pool, own)                       # the class's own images are always searched
        d_all, i_all = nearest(mine, train.images[refs])
        neighbours[c] = train.images[own[i_same]]
        real = held_out.images[held_out.labels == c] if held_out is not None else samples[:0]
        r_same = nearest(real, train.images[own])[0] if len(real) else np.zeros(0)
        rows.append({"class": int(c), "name": names[c], "train": int(len(own)), "held_out": int(len(real)),
                     "n": int(len(mine)),
                     "sample_nn_same": _median(d_same), "sample_nn_all": _median(d_all),
                     "held_out_nn_same": _median(r_same),
                     "copies": float((d_all <= threshold).mean()) if len(mine) else None,
                     "nearest_train_index": [int(own[i]) for i in i_same],
                     "nearest_any_class": [int(train.labels[refs[i]]) for i in i_all]})
    return rows, neighbours


def held_out_baseline(train, held_out) -> float | None:
    """The median distance of every held-out real image to the nearest training image of its class."""
    if held_out is None or len(held_out) == 0:
        return None
    dists = []
    for c in np.unique(held_out.labels):
        own = train.images[train.labels == c]
        if len(own):
            dists.append(nearest(held_out.images[held_out.labels == c], own)[0])
    return _median(np.concatenate(dists)) if dists else None


@dataclasses.dataclass
class NearestReport:
    rows: list[dict]
    summary: dict
    samples: np.ndarray            # uint8 (N, H, W, C), grouped by class (n_per_class each)
    labels: np.ndarray
    neighbours: dict               # class -> uint8 (n, H, W, C): each sample's nearest training image of its class


def scarce_classes(train, at_most: int = SCARCE) -> list[int]:
    """The classes with between 1 and ``at_most`` training images."""
    counts = train.class_counts()
    return [c for c, n in enumerate(counts) if 0 < n <= at_most]


def nearest_report(model, classes: list[int] | None = None, n_per_class: int = 8, max_train_images: int | None = None,
                   seed: int = 0, settings=None, percentile: float = 5.0, batch_size: int = 250,
                   train=None, held_out=None, log=print) -> NearestReport:
    """Sample ``n_per_class`` images of each class (default: :func:`scarce_classes` of the model's
    training data) and measure them against the model's training data (``train``: default the data
    its config describes, ``data.from_config``) and its ``test`` split (the held-out reals; none when
    the model trained on another split than ``train``)."""
    if model.num_classes == 0:
        raise DiffloError("the nearest-neighbour check is per class: this model is unconditional")
    d = model.cfg.data
    if train is None:
        train = data_mod.from_config(d)
        if d.split == "train":
            try:
                held_out = data_mod.load_split(d, "test")
            except DiffloError as e:
                log(f"note: no held-out reals ({e})")
    if train.images.shape[1:] != (model.cfg.model.image_size, model.cfg.model.image_size, model.cfg.model.in_channels):
        raise DiffloError(f"the training data is {train.images.shape[1:]}, the model makes "
                          f"{model.cfg.model.image_size}x{model.cfg.model.image_size}x{model.cfg.model.in_channels}")
    if train.num_classes != model.num_classes:
        raise DiffloError(f"the model has {model.num_classes} classes, its data set {d.name} now has "
                          f"{train.num_classes}")
    if classes is None:
        classes = scarce_classes(train)
        if not classes:
            raise DiffloError(f"no class of {d.name} has {SCARCE} or fewer training images; choose some with "
                              f"--classes")
    pool = np.arange(len(train))
    if max_train_images is not None and max_train_images < len(train):
        pool = np.sort(np.random.default_rng(seed).choice(len(train), max_train_images, replace=False))
    threshold = copy_threshold(train.images[pool], percentile, seed=seed)
    settings = settings or settings_for(model)
    labels = torch.tensor(classes).repeat_interleave(n_per_class)
    samples = to_uint8(generate(model, labels, [seed + i for i in range(len(labels))], settings,
                                batch_size=batch_size))
    labels = labels.numpy()
    rows, neighbours = class_rows(samples, labels, train, held_out, classes, threshold, pool)
    searched = np.union1d(pool, np.flatnonzero(np.isin(train.labels, classes)))
    summary = {"threshold": threshold, "percentile": percentile, "n_per_class": n_per_class,
               "train_images": int(len(train)), "searched_images": int(len(searched)),
               "held_out_nn_same_all_classes": held_out_baseline(train, held_out),
               "seed": seed, **dataclasses.asdict(settings), "distance": "per-pixel RMS, [0, 1] scale"}
    return NearestReport(rows, summary, samples, labels, neighbours)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_report(rep: NearestReport) -> str:
    """A table, one row per class, and how it was measured."""
    s = rep.summary
    width = max([len("class")] + [len(r["name"]) for r in rep.rows])
    lines = [f"{'class':<{width}}  train  held-out  sample NN (class)  sample NN (all)  held-out NN (class)  copies"]
    for r in rep.rows:
        lines.append(f"{r['name']:<{width}}  {r['train']:>5}  {r['held_out']:>8}  {_fmt(r['sample_nn_same']):>17}  "
                     f"{_fmt(r['sample_nn_all']):>15}  {_fmt(r['held_out_nn_same']):>19}  "
                     f"{r['copies'] * 100:5.0f}%")
    lines.append(f"medians of per-pixel RMS distances ([0, 1] scale) to the nearest training image of the class / of "
                 f"any class ({s['searched_images']} of {s['train_images']} searched); N={s['n_per_class']} samples "
                 f"per class ({s['sampler']}, {s['steps']} steps, w={s['w']}, seed {s['seed']})")
    lines.append(f"held-out reals (all classes), nearest training image of their class: median "
                 f"{_fmt(s['held_out_nn_same_all_classes'])}; copies: samples at most {s['threshold']:.3f} from a "
                 f"training image (the {s['percentile']:g}th percentile of training images' distances to their "
                 f"nearest other one)")
    return "\n".join(lines)


def report_grid(rep: NearestReport, class_label=str):
    """A PIL image: one row per class, each sample followed by its nearest training image of its class."""
    cells, names = [], []
    for r in rep.rows:
        c = r["class"]
        mine = rep.samples[rep.labels == c]
        for s, nn in zip(mine, rep.neighbours[c]):
            cells += [s, nn]
        names.append(class_label(c))
    return grid_image(np.stack(cells), 2 * rep.summary["n_per_class"], names)
