"""A small CNN classifier, trained on real images, that scores class-conditional samples.

"Class accuracy" of a conditional generator = the fraction of samples generated for class c that
this classifier, trained only on real data, assigns to c. On mnist10k the classifier reaches about
98-99% on the 2,000 held-out real digits (printed when it is trained).

One classifier per data set *and options*: the cached file's name (:func:`classifier_name`) holds
the data set's name, its label and styles (emoji), attribute (celeba), background (when not white)
and image size, e.g. ``mnist10k.safetensors``, ``emoji-subcategory-32.safetensors``. Colour data
(3 channels) is trained with random horizontal flips and edge padding for the shifts; 1-channel
data keeps the original training. The network's ``width`` is a parameter (``--width``), stored in
the file's metadata so that loading rebuilds the same network; 32 by default (on emoji at 32x32
it reaches 61% of the 98 subcategories held out, docs/evaluation.md).
"""
from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .. import data as data_mod
from ..data import DATASETS, ArrayDataset, emoji, options_of
from ..checkpoint import read_safetensors, sha256_file
from ..errors import DiffloError
from ..images import WHITE, parse_colour
from ..io import atomic_path, cache_home


class Classifier(nn.Module):
    """conv(32) -> conv(32) -> pool -> conv(64) -> conv(64) -> pool -> global average -> linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [-1, 1] -> (B, 2 * width)
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # (B, C, H, W) in [-1, 1] -> (B, classes)
        return self.head(self.features_of(x))


def default_epochs(n: int, batch_size: int = 128, target_steps: int = 1000) -> int:
    """Enough epochs for about target_steps optimizer steps, between 1 and 8 (8 on mnist10k)."""
    return max(1, min(8, math.ceil(target_steps / max(1, n // batch_size))))


WIDTH = 32        # mnist10k: 98-99% held out; emoji 32x32: 61.2% of 98 subcategories (docs/evaluation.md)


def train_classifier(train: ArrayDataset, epochs: int | None = None, batch_size: int = 128, lr: float = 3e-3,
                     seed: int = 0, log=print, width: int | None = None, flip: bool | None = None) -> Classifier:
    """``width``: default ``WIDTH``; ``flip``: random horizontal flips (default: colour data
    only; digits are not mirror-symmetric). Colour images are shifted with edge padding, 1-channel
    ones with the background value -1."""
    batch_size = max(1, min(batch_size, len(train)))            # a tiny data set still takes steps
    epochs = epochs or default_epochs(len(train), batch_size)
    colour = train.channels != 1
    flip = colour if flip is None else flip
    torch.manual_seed(seed)
    clf = Classifier(train.channels, train.num_classes, width or WIDTH)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr)
    n = len(train)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    clf.train()
    for epoch in range(epochs):
        perm = rng.permutation(n)
        for k in range(n // batch_size):
            x, y = train.batch(perm[k * batch_size:(k + 1) * batch_size])
            x = _augment(x, rng, edge=colour)
            if flip:
                mirror = torch.from_numpy(rng.random(len(x)) < 0.5)[:, None, None, None]
                x = torch.where(mirror, x.flip(3), x)
            loss = F.cross_entropy(clf(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return clf.eval()


def _augment(x: torch.Tensor, rng: np.random.Generator, max_shift: int = 2, edge: bool = False) -> torch.Tensor:
    """Random translation by up to max_shift pixels (padding with the background value -1, or with
    the edge pixels where ``edge``: colour images may have any background)."""
    dx, dy = rng.integers(-max_shift, max_shift + 1, size=2)
    x = F.pad(x, (max_shift,) * 4, mode="replicate") if edge else F.pad(x, (max_shift,) * 4, value=-1.0)
    h, w = x.shape[2] - 2 * max_shift, x.shape[3] - 2 * max_shift
    return x[:, :, max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


@torch.no_grad()
def predict(clf: Classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels for images (N, C, H, W) in [-1, 1]."""
    clf.eval()
    return torch.cat([clf(images[i:i + batch_size].float()).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Overall and per-class accuracy of clf on (images, labels)."""
    return accuracy_of(predict(clf, images), labels, num_classes)


def accuracy_of(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Overall and per-class accuracy of predicted labels."""
    per_class = {int(c): float((pred[labels == c] == c).float().mean()) for c in range(num_classes)
                 if (labels == c).any()}
    return {"accuracy": float((pred == labels).float().mean()), "per_class": per_class, "n": len(labels)}


def category_accuracy(pred, labels, categories) -> float:
    """The fraction of predictions in the same category as the true (asked) class: ``categories[c]``
    is class c's category (e.g. an emoji subcategory's category), so a wrong class of the right
    category counts as right."""
    cat = np.asarray(categories, dtype=object)
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((cat[pred] == cat[labels]).mean()) if len(labels) else float("nan")


def class_categories(data_name: str, classes, label=None, root=None, styles=None) -> tuple[str, ...] | None:
    """Each class's category, where a data set's classes have one (emoji subcategories); else None.
    From the data set's own files (DataError when they are not there)."""
    if data_name != "emoji":
        return None
    label, styles = emoji.check_options(label, styles)
    if label != "subcategory":
        return None
    mapping = emoji.category_of(root, styles)
    missing = [c for c in classes if c not in mapping]
    if missing:
        raise DiffloError(f"emoji subcategories {missing[:3]} are not in the emoji data's emoji.json; is it the "
                          f"same version the model was trained on?")
    return tuple(mapping[c] for c in classes)


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_classifier(clf: Classifier, path: Path, meta: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(clf.state_dict(), str(tmp), metadata={k: str(v) for k, v in meta.items()})


def load_classifier(path: Path, in_channels: int, num_classes: int, width: int = 32) -> Classifier:
    clf = Classifier(in_channels, num_classes, width)
    clf.load_state_dict(load_file(str(path)))
    return clf.eval()


def data_options(data_name: str, image_size: int | None = None, label=None, styles=None, background=None,
                 attribute=None) -> dict:
    """The options that decide a data set's classes and pixels, canonical (defaults filled in where the
    data set has them, the others dropped): ``{"image_size", "label", "styles", "background",
    "attribute"}`` keys, only those that apply."""
    spec = DATASETS.get(data_name)
    takes = spec.options if spec else ()
    out: dict = {}
    if data_name == "emoji":
        out["label"], chosen = emoji.check_options(label, styles)
        if chosen != emoji.STYLES:
            out["styles"] = ",".join(chosen)
        image_size = emoji.check_size(image_size)
    if attribute and "attribute" in takes:
        out["attribute"] = attribute
    if background is not None and "background" in takes and parse_colour(background) != WHITE:
        out["background"] = ",".join(str(v) for v in parse_colour(background))        # r,g,b
    if image_size is not None:
        out["image_size"] = int(image_size)
    return out


def classifier_name(data_name: str, image_size: int | None = None, **options) -> str:
    """The cached classifier's file stem: the data set's name, then its label, styles, attribute and
    background (where they apply and are not the default white), then the image size (when given;
    always for emoji): ``mnist10k``, ``mnist10k-32``, ``emoji-subcategory-32``,
    ``emoji-category-google-bg000000-32``."""
    o = data_options(data_name, image_size, **options)
    parts = [data_name] + [str(o[k]).replace(",", "+") for k in ("label", "styles", "attribute") if k in o]
    if "background" in o:
        parts.append("bg" + "".join(f"{int(v):02x}" for v in o["background"].split(",")))
    if "image_size" in o:
        parts.append(str(o["image_size"]))
    return "-".join(parts)


def default_classifier_path(data_name: str, image_size: int | None = None, **options) -> Path:
    """Where `difflo eval train-classifier --data NAME [options]` puts its classifier by default:
    $XDG_CACHE_HOME/difflo/classifiers/STEM.safetensors (~/.cache/difflo/... without XDG_CACHE_HOME),
    STEM = :func:`classifier_name` (just NAME for a data set without options at its own size)."""
    return cache_home() / "classifiers" / f"{classifier_name(data_name, image_size, **options)}.safetensors"


def classifier_path_for(data_cfg) -> Path:
    """The cached classifier for a model's data (a ``DataConfig``: name, image size, label, styles, ...)."""
    return default_classifier_path(data_cfg.name, getattr(data_cfg, "image_size", None), **options_of(data_cfg))


def train_command(data_cfg) -> str:
    """The `difflo eval train-classifier ...` command that writes :func:`classifier_path_for` ``(data_cfg)``."""
    o = data_options(data_cfg.name, getattr(data_cfg, "image_size", None), **options_of(data_cfg))
    words = ["difflo", "eval", "train-classifier", "--data", data_cfg.name]
    for k in ("label", "styles", "attribute", "background", "image_size"):
        if k in o:
            words += [f"--{k.replace('_', '-')}", str(o[k])]
    if getattr(data_cfg, "root", None):
        words += ["--root", str(data_cfg.root)]
    return shlex.join(words)


def classifier_record(path: str | Path) -> dict:
    """``{"classifier": file name, "classifier_sha256": hex}``: how results name the classifier they used,
    the same on every machine (an absolute path names one machine's cache)."""
    return {"classifier": Path(path).name, "classifier_sha256": sha256_file(path)}


def load_classifier_file(path: str | Path) -> tuple[Classifier, dict]:
    """A classifier written by `difflo eval train-classifier` (shape and data set in its metadata)."""
    path = Path(path)
    if not path.is_file():
        raise DiffloError(f"classifier {path} not found; train one with `difflo eval train-classifier --data NAME "
                          f"--out {path}`")
    state, meta = read_safetensors(path, "file")
    if meta.get("kind") != "difflo-classifier":
        raise DiffloError(f"{path} is not a difflo classifier (make one with `difflo eval train-classifier`)")
    clf = Classifier(int(meta["in_channels"]), int(meta["num_classes"]), int(meta.get("width", 32)))
    try:
        clf.load_state_dict(state)
    except RuntimeError as e:
        raise DiffloError(f"{path}: weights do not fit the classifier ({str(e).splitlines()[0]})") from None
    return clf.eval(), meta


def classifier_classes(meta: dict) -> tuple[str, ...] | None:
    """The class names a classifier file was trained on (None for files from before they were stored)."""
    return tuple(json.loads(meta["classes"])) if meta.get("classes") else None


def train_and_save(data_name: str, out: str | Path, root: str | None = None, split: str = "train",
                   test_split: str = "test", epochs: int | None = None, seed: int = 0, image_size: int | None = None,
                   log=print, width: int | None = None, cache_dir=None, **options) -> dict:
    """Train the classifier on a data set's train split, measure it on the test split, save it.
    ``options``: the data set's options (label, styles, background, attribute; as ``data.load``)."""
    options = {k: v for k, v in options.items() if v is not None}
    train = data_mod.load(data_name, split, root=root, image_size=image_size, cache_dir=cache_dir, **options)
    if train.num_classes < 2:
        raise DiffloError(f"{data_name} has no class labels: a classifier needs a labelled data set")
    width = width or WIDTH
    log(f"training a classifier on {data_name}/{split} ({len(train)} images, {train.num_classes} classes, "
        f"{train.image_size}x{train.image_size}x{train.channels}, width {width})")
    t0 = time.time()
    clf = train_classifier(train, epochs=epochs, seed=seed, log=log, width=width)
    meta = {"kind": "difflo-classifier", "data": data_name, "split": split, "in_channels": train.channels,
            "num_classes": train.num_classes, "image_size": train.image_size, "seed": seed, "width": width,
            "train_seconds": round(time.time() - t0)}
    meta.update({k: v for k, v in data_options(data_name, image_size, **options).items() if k != "image_size"})
    if train.classes:
        meta["classes"] = json.dumps(list(train.classes))
    try:
        test = data_mod.load(data_name, test_split, root=root, image_size=image_size, cache_dir=cache_dir, **options)
        x, y = test.batch(range(len(test)))
        pred = predict(clf, x)
        res = accuracy_of(pred, y, test.num_classes)
        meta.update(test_split=test_split, test_accuracy=f"{res['accuracy']:.4f}", test_n=res["n"])
        log(f"classifier accuracy on {data_name}/{test_split} (real, held out): {res['accuracy']:.4f} "
            f"(N={res['n']})")
    except DiffloError as e:
        log(f"note: no held-out accuracy ({e})")
    else:
        try:
            categories = class_categories(data_name, test.classes, options.get("label"), root, options.get("styles"))
        except DiffloError as e:
            log(f"note: no held-out category accuracy ({e})")
            categories = None
        if categories:
            cat = category_accuracy(pred, y, categories)
            meta["test_category_accuracy"] = f"{cat:.4f}"
            log(f"  its category accuracy ({len(set(categories))} categories; the predicted class in the true "
                f"class's category): {cat:.4f} (N={res['n']})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(clf, out, meta)
    return meta
