"""A small CNN classifier, trained on real images, that scores class-conditional samples.

"Class accuracy" of a conditional generator = the fraction of samples generated for class c that
this classifier, trained only on real data, assigns to c. On mnist10k the classifier reaches about
98-99% on the 2,000 held-out real digits (printed when it is trained).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import ArrayDataset
from ..checkpoint import read_safetensors, sha256_file
from ..errors import DiffloError
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


def train_classifier(train: ArrayDataset, epochs: int | None = None, batch_size: int = 128, lr: float = 3e-3,
                     seed: int = 0, log=print) -> Classifier:
    epochs = epochs or default_epochs(len(train), batch_size)
    torch.manual_seed(seed)
    clf = Classifier(train.channels, train.num_classes)
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
            x = _augment(x, rng)
            loss = F.cross_entropy(clf(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return clf.eval()


def _augment(x: torch.Tensor, rng: np.random.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to max_shift pixels (padding with the background value -1)."""
    dx, dy = rng.integers(-max_shift, max_shift + 1, size=2)
    x = F.pad(x, (max_shift,) * 4, value=-1.0)
    h, w = x.shape[2] - 2 * max_shift, x.shape[3] - 2 * max_shift
    return x[:, :, max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


@torch.no_grad()
def predict(clf: Classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels for images (N, C, H, W) in [-1, 1]."""
    clf.eval()
    return torch.cat([clf(images[i:i + batch_size].float()).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Overall and per-class accuracy of clf on (images, labels)."""
    pred = predict(clf, images)
    per_class = {int(c): float((pred[labels == c] == c).float().mean()) for c in range(num_classes)
                 if (labels == c).any()}
    return {"accuracy": float((pred == labels).float().mean()), "per_class": per_class, "n": len(labels)}


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_classifier(clf: Classifier, path: Path, meta: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(clf.state_dict(), str(tmp), metadata={k: str(v) for k, v in meta.items()})


def load_classifier(path: Path, in_channels: int, num_classes: int) -> Classifier:
    clf = Classifier(in_channels, num_classes)
    clf.load_state_dict(load_file(str(path)))
    return clf.eval()


def default_classifier_path(data_name: str) -> Path:
    """Where `difflo eval train-classifier --data NAME` puts its classifier by default:
    $XDG_CACHE_HOME/difflo/classifiers/NAME.safetensors (~/.cache/difflo/... without XDG_CACHE_HOME)."""
    return cache_home() / "classifiers" / f"{data_name}.safetensors"


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
    clf = Classifier(int(meta["in_channels"]), int(meta["num_classes"]))
    try:
        clf.load_state_dict(state)
    except RuntimeError as e:
        raise DiffloError(f"{path}: weights do not fit the classifier ({str(e).splitlines()[0]})") from None
    return clf.eval(), meta


def train_and_save(data_name: str, out: str | Path, root: str | None = None, split: str = "train",
                   test_split: str = "test", epochs: int | None = None, seed: int = 0, image_size: int | None = None,
                   log=print) -> dict:
    """Train the classifier on a data set's train split, measure it on the test split, save it."""
    from .. import data as data_mod
    train = data_mod.load(data_name, split, root=root, image_size=image_size)
    if train.num_classes < 2:
        raise DiffloError(f"{data_name} has no class labels: a classifier needs a labelled data set")
    log(f"training a classifier on {data_name}/{split} ({len(train)} images, {train.num_classes} classes)")
    clf = train_classifier(train, epochs=epochs, seed=seed, log=log)
    meta = {"kind": "difflo-classifier", "data": data_name, "split": split, "in_channels": train.channels,
            "num_classes": train.num_classes, "image_size": train.image_size, "seed": seed}
    try:
        test = data_mod.load(data_name, test_split, root=root, image_size=image_size)
        x, y = test.batch(range(len(test)))
        res = accuracy(clf, x, y, test.num_classes)
        meta.update(test_split=test_split, test_accuracy=f"{res['accuracy']:.4f}", test_n=res["n"])
        log(f"classifier accuracy on {data_name}/{test_split} (real, held out): {res['accuracy']:.4f} "
            f"(N={res['n']})")
    except DiffloError as e:
        log(f"note: no held-out accuracy ({e})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(clf, out, meta)
    return meta
