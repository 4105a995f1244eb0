"""Oxford Flowers-102 (Nilsback & Zisserman 2008): 8,189 photos of 102 flower species.

Reads ``jpg/image_00001.jpg`` .. ``jpg/image_08189.jpg`` (from ``102flowers.tgz``),
``imagelabels.mat`` (``labels``: 1..102 for image 1..8189; difflo uses 0..101) and ``setid.mat``
(``trnid``, ``valid``, ``tstid``: 1-based image ids of the train (1,020), val (1,020) and test
(6,149) splits). ``split=all`` is all 8,189 in image-id order. Images are resized (shorter side)
and center-cropped to ``image_size`` (default 64), decoded once and cached.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from . import cache
from .base import ArrayDataset, check_split, resolve_root
from .decode import decode_all

SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}
ALIASES = {"valid": "val"}
FILE_LIST = "jpg/image_XXXXX.jpg (from 102flowers.tgz), imagelabels.mat, setid.mat"
DEFAULT_SIZE = 64
NUM_CLASSES = 102
CLASSES = tuple(f"flower {i}" for i in range(1, NUM_CLASSES + 1))   # the original 1-based label


def read_mat(path: Path, key: str) -> np.ndarray:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"reading {path} needs scipy (for .mat files): pip install scipy") from None
    if not path.is_file():
        raise DataError(f"{path} not found; Flowers-102 reads {FILE_LIST}: run `difflo data download flowers102 "
                        f"--root {path.parent}` or download it from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/")
    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as e:             # scipy raises ValueError, TypeError, MatReadError, ... on bad files
        raise DataError(f"{path}: not a readable .mat file ({type(e).__name__}: {e}); download it again") from None
    if key not in mat:
        raise DataError(f"{path}: no variable {key!r} (it has {', '.join(k for k in mat if not k.startswith('__'))})")
    return np.atleast_1d(np.asarray(mat[key])).astype(np.int64)


def base_dir(root: Path) -> Path:
    for d in (root, root / "flowers-102"):
        if (d / "jpg").is_dir() or (d / "imagelabels.mat").is_file():
            return d
    if (root / "102flowers.tgz").is_file():
        tgz = root / "102flowers.tgz"
        raise DataError(f"{tgz} is not extracted: run `tar xzf {tgz} -C {root}`")
    return root


def index(split: str, root) -> tuple[list[Path], np.ndarray, Path, str]:
    """The image files and labels (0..101) of a split, from the .mat files (no decoding)."""
    split = check_split("flowers102", split, tuple(SPLITS), ALIASES)
    root = resolve_root("flowers102", root, FILE_LIST)
    d = base_dir(root)
    labels = read_mat(d / "imagelabels.mat", "labels")
    if len(labels) and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise DataError(f"{d / 'imagelabels.mat'}: labels must be 1..{NUM_CLASSES}, found "
                        f"{labels.min()}..{labels.max()}")
    if split == "all":
        ids = np.arange(1, len(labels) + 1)
    else:
        ids = read_mat(d / "setid.mat", SPLITS[split])
        if len(ids) and (ids.min() < 1 or ids.max() > len(labels)):
            raise DataError(f"{d / 'setid.mat'} lists image id {ids.max()}, but {d / 'imagelabels.mat'} labels only "
                            f"{len(labels):,} images; the two files do not belong together: download them again")
    jpg = d / "jpg"
    if not jpg.is_dir():
        raise DataError(f"{jpg} not found; extract 102flowers.tgz into {d} (it holds jpg/image_00001.jpg ...)")
    n_files = sum(1 for _ in jpg.glob("image_*.jpg"))
    if n_files != len(labels):
        raise DataError(f"{d / 'imagelabels.mat'} labels {len(labels):,} images but {jpg} holds {n_files:,} "
                        f"image_*.jpg files; extract 102flowers.tgz again (or use the matching .mat files)")
    files = [jpg / f"image_{i:05d}.jpg" for i in ids]
    return files, labels[ids - 1] - 1, d, split


def load_flowers102(split="train", root=None, image_size=None, cache_dir=None, **_) -> ArrayDataset:
    files, labels, d, split = index(split, root)
    size = image_size or DEFAULT_SIZE
    fix = "extract 102flowers.tgz again"
    plan = cache.Plan((len(files), size, size, 3),
                      lambda out: decode_all(files, size, 3, desc=f"flowers102 {split}", fix=fix, out=out))
    images, _ = cache.cached("flowers102", split, size, files, f"flowers102 rgb resize-shorter+center-crop {size}",
                             cache_dir, lambda: plan)
    return ArrayDataset(images, labels, NUM_CLASSES, "flowers102", classes=CLASSES, split=split,
                        source=str(d))
