"""Scoring generated images: a Frechet distance to reference statistics, KID and precision/recall
against the reference features, and class accuracy.

Used by ``difflo eval`` and by the periodic evaluation during training (``eval.every``). Every
result records what it was measured with: N, the feature extractor, sampler, steps and w.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.decode import decode, is_image_file, probe
from ..errors import DiffloError
from ..generate import generate, record, settings_for
from ..images import to_uint8
from . import fid as fid_mod, kid as kid_mod
from .classifier import (accuracy_of, category_accuracy, classifier_record, load_classifier_file, predict,
                         uint8_to_tensor)
from .precision_recall import K as PRC_K, needs as prc_needs, precision_recall


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ... (n labels): every class equally often (+-1)."""
    return torch.arange(n) % max(num_classes, 1)


def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm bar over images (off unless ``progress``)."""
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)


def generate_samples(model, n: int, seed: int = 0, sampler: str | None = None, steps: int | None = None,
                     w: float | None = None, batch_size: int = 250, progress: bool = False,
                     spacing: str | None = None, guide=None, **guidance) -> tuple[np.ndarray, np.ndarray, dict]:
    """n class-balanced samples as uint8 (N, H, W, C), their labels, and the settings used (None: the
    model's own sample settings; the sampler options it does not read are left out). ``guidance``: the
    sample.guidance_* overrides; ``guide``: an autoguidance guide model (``--guide``)."""
    settings = settings_for(model, sampler=sampler, steps=steps, w=w, spacing=spacing, **guidance)
    labels = balanced_labels(n, model.num_classes)
    with progress_bar(n, "sampling", progress) as bar:
        images = generate(model, labels, [seed + i for i in range(n)], settings, batch_size=batch_size, progress=bar,
                          guide=guide)
    return to_uint8(images), labels.numpy(), {**record(settings), "seed": seed}


def reference_stats(dataset, extractor, n: int | None = None, seed: int = 0, progress: bool = False) -> dict:
    """Feature statistics and the features (for KID, precision/recall) of (a seeded random subset of n
    images of) a data set."""
    idx = np.arange(len(dataset))
    if n is not None and n < len(dataset):
        idx = np.sort(np.random.default_rng(seed).choice(len(dataset), n, replace=False))
    with progress_bar(len(idx), "reference features", progress) as bar:
        feats = extractor(dataset.images[idx], progress=bar)
    mu, sigma = fid_mod.feature_stats(feats)
    return {"mu": mu, "sigma": sigma, "n": len(idx), "extractor": extractor.name, "features": feats.astype(np.float32)}


def kid_precision_recall(feats: np.ndarray, ref_feats: np.ndarray, extractor, kid_subset_size: int | None = None,
                         kid_subsets: int = kid_mod.SUBSETS, seed: int = 0) -> dict:
    """KID (``kid``, or ``kd_classifier`` in the classifier's features) with its spread over subsets,
    and precision/recall (``prc_precision``, ``prc_recall``; k = 3) on equal numbers of generated and
    reference vectors: the larger set is cut to the smaller one's size by a seeded random choice, as Kynkaanniemi et al. compare equal
    sets (a set's k-NN balls shrink as it grows, so unequal sets would tilt precision against recall).
    Where the sets are too small for precision/recall (fewer than ``needs(k)``), it is left out and
    ``notes`` says so; KID needs 2 vectors in each set, as the Frechet distance does."""
    k = kid_mod.kid(feats, ref_feats, kid_subset_size, kid_subsets, seed)
    name = fid_mod.kid_metric_name(extractor)
    out = {name: k["kid"], f"{name}_std": k["kid_std"], "kid_subset_size": k["kid_subset_size"],
           "kid_subsets": k["kid_subsets"]}
    n = min(len(feats), len(ref_feats))
    if n < prc_needs():
        out["notes"] = [f"no precision/recall: its k = {PRC_K} nearest neighbours need at least {prc_needs()} "
                        f"samples and reference images, got N={len(feats)} vs {len(ref_feats)}"]
        return out
    rng = np.random.default_rng(seed)
    pick = lambda f: f if len(f) == n else f[np.sort(rng.choice(len(f), n, replace=False))]
    out.update(precision_recall(pick(feats), pick(ref_feats)))
    return out


def extractor_for_stats(stats: dict, inception: str | None = None, classifier: str | None = None, device="cpu"):
    """The feature extractor that made a statistics file (its path is recorded in the file)."""
    if str(stats["extractor"]).startswith("difflo-classifier"):
        path = classifier or stats.get("classifier")
        if not path:
            raise DiffloError("these statistics use a difflo classifier's features: pass --classifier PATH")
        return fid_mod.ClassifierFeatures(path, device)
    return fid_mod.InceptionFeatures(inception or stats.get("inception") or None, device)


def score(images: np.ndarray, labels: np.ndarray | None, *, ref: dict | None = None, extractor=None,
          classifier: str | Path | None = None, categories=None, progress: bool = False,
          kid_subset_size: int | None = None, kid_subsets: int = kid_mod.SUBSETS) -> dict:
    """{fid or fd_classifier, kid or kd_classifier, prc_precision, prc_recall, class_accuracy, per_class, n, ...}
    for uint8 (N, H, W, C) images. KID and precision/recall need a reference with ``features``
    (statistics files written before they existed hold only mu and sigma: those give the distance only).

    ``categories``: each class's category (``classifier.class_categories``, e.g. an emoji
    subcategory's); adds ``category_accuracy``, the fraction of samples the classifier puts in a
    class of the asked class's category."""
    out: dict = {"n": int(len(images))}
    if ref is not None:
        with progress_bar(len(images), "features", progress) as bar:
            feats = extractor(images, progress=bar)
        name = fid_mod.metric_name(extractor)
        out[name] = fid_mod.distance_to(ref, feats, extractor.name)
        out.update(feature_extractor=extractor.name, ref_n=int(ref["n"]))
        if ref.get("features") is not None:
            out.update(kid_precision_recall(feats, ref["features"], extractor, kid_subset_size, kid_subsets))
    if classifier is not None:
        if labels is None:
            raise DiffloError("class accuracy needs the samples' labels (an .npz with 'labels', as written by "
                              "`difflo sample --n N --out X.npz`)")
        clf, meta = load_classifier_file(classifier)
        if images.shape[-1] != int(meta["in_channels"]) or (meta.get("image_size") and
                                                           images.shape[1] != int(meta["image_size"])):
            raise DiffloError(f"classifier {classifier} is for {meta['image_size']}x{meta['image_size']}x"
                              f"{meta['in_channels']} images, the samples are {images.shape[1]}x{images.shape[2]}x"
                              f"{images.shape[3]}")
        num_classes = int(meta["num_classes"])
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DiffloError(f"sample labels out of range for the classifier's {num_classes} classes")
        pred = predict(clf, uint8_to_tensor(images))
        acc = accuracy_of(pred, labels, num_classes)
        out.update(class_accuracy=acc["accuracy"], per_class=acc["per_class"], **classifier_record(classifier),
                   classifier_data=meta.get("data"), classifier_test_accuracy=meta.get("test_accuracy"))
        if categories is not None:
            if len(categories) != num_classes:
                raise DiffloError(f"{len(categories)} class categories for the classifier's {num_classes} classes")
            out.update(category_accuracy=category_accuracy(pred, labels, categories),
                       num_categories=len(set(categories)),
                       classifier_test_category_accuracy=meta.get("test_category_accuracy"))
    return out


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (N, H, W, C) images and labels (or None) from an .npz sample set or a folder of images."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
        if not files:
            raise DiffloError(f"{path} holds no images (.png/.jpg); give an .npz from `difflo sample --n N`")
        channels = 1 if probe(files[0])[0] in ("L", "I;16", "I", "1") else 3
        images = [decode(f, None, channels) for f in files]
        if len({im.shape for im in images}) > 1:
            raise DiffloError(f"images in {path} differ in size or channels; all samples must share one shape")
        return np.stack(images), None
    if not path.is_file():
        raise DiffloError(f"samples {path} not found: give an .npz written by `difflo sample --n N --out X.npz` "
                          f"or a folder of images")
    z = fid_mod.read_npz(path)
    if z is None or "images" not in z:
        raise DiffloError(f"{path} is not a sample set ({'not an .npz archive' if z is None else 'no images array'}); "
                          f"give the .npz that `difflo sample --n N --out X.npz` writes, or a folder of images")
    images, labels = z["images"], z.get("labels")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DiffloError(f"{path}: 'images' must be uint8 (N, H, W, C) with C = 1 or 3, got {images.dtype} "
                          f"{images.shape}")
    return images, labels


def format_result(res: dict) -> str:
    """One line per metric, each naming N and how it was measured."""
    lines = []
    how = ", ".join(f"{k}={res[k]}" for k in ("sampler", "steps", "w") if k in res)
    how = f" ({how})" if how else ""
    for name in ("fid", "fd_classifier"):
        if name in res:
            label = "FID" if name == "fid" else "FD (difflo classifier features; not FID)"
            lines.append(f"{label}: {res[name]:.2f}  [N={res['n']} samples vs {res['ref_n']} reference images, "
                         f"{res['feature_extractor']}]{how}")
    for name in ("kid", "kd_classifier"):
        if name in res:
            label = "KID" if name == "kid" else "KD (difflo classifier features; not KID)"
            lines.append(f"{label}: {res[name]:.5f} +- {res[name + '_std']:.5f}  [unbiased MMD^2, cubic kernel; mean "
                         f"+- sd over {res['kid_subsets']} subsets of m={res['kid_subset_size']} from the N={res['n']} "
                         f"samples and the {res['ref_n']} reference images]{how}")
    if "prc_precision" in res:
        lines.append(f"precision: {res['prc_precision']:.4f}  recall: {res['prc_recall']:.4f}  [k={res['prc_k']} "
                     f"nearest neighbours, {res['prc_n_gen']} samples vs {res['prc_n_real']} reference images, "
                     f"{res['feature_extractor']}]{how}")
    if "class_accuracy" in res:
        per = " ".join(f"{c}:{a:.2f}" for c, a in res["per_class"].items())
        digest = f" sha256:{res['classifier_sha256'][:12]}" if res.get("classifier_sha256") else ""
        lines.append(f"class accuracy: {res['class_accuracy']:.4f}  [N={res['n']}, classifier "
                     f"{res['classifier']}{digest} (held-out real accuracy {res.get('classifier_test_accuracy')})]{how}")
        lines.append(f"  per class: {per}")
    if "category_accuracy" in res:
        lines.append(f"category accuracy: {res['category_accuracy']:.4f}  [N={res['n']}, {res['num_categories']} "
                     f"categories: the predicted class is in the asked class's category (held-out real "
                     f"{res.get('classifier_test_category_accuracy')})]{how}")
    lines += [f"note: {note}" for note in res.get("notes", ())]
    return "\n".join(lines)
