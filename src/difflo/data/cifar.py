"""CIFAR-10 (Krizhevsky 2009) from the "python version" batches.

``cifar-10-batches-py/data_batch_1..5`` (train, 10,000 images each) and ``test_batch`` are pickled
dicts: ``data`` uint8 (10000, 3072), each row 1024 red, 1024 green, 1024 blue values of a 32x32
image in row-major order; ``labels`` a list of 10,000 ints in 0..9. ``batches.meta`` holds
``label_names``. The pickles are read with an unpickler that only rebuilds numpy arrays, so a
tampered file cannot run code.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import ArrayDataset, check_split, resolve_root

FOLDER = "cifar-10-batches-py"
TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST = ("test_batch",)
FILE_LIST = f"{FOLDER}/ (data_batch_1..5, test_batch, batches.meta; from cifar-10-python.tar.gz)"

_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
            ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class _Refused(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise _Refused(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        if module.startswith("numpy.core"):                 # numpy >= 2 moved numpy.core to numpy._core
            try:
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise DataError(f"{path}: {e}; this is not an original CIFAR-10 batch: extract cifar-10-python.tar.gz "
                        f"again") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); the file is truncated "
                        f"or corrupt: extract cifar-10-python.tar.gz again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def batches_dir(root: Path) -> Path:
    for d in (root / FOLDER, root):
        if (d / "data_batch_1").is_file() or (d / "test_batch").is_file() or (d / "batches.meta").is_file():
            return d
    tar = root / "cifar-10-python.tar.gz"
    if tar.is_file():
        raise DataError(f"{tar} is not extracted: run `tar xzf {tar} -C {root}` (or `difflo data download cifar10 "
                        f"--root {root}`, which extracts it)")
    raise DataError(f"{root / FOLDER} not found (CIFAR-10 reads {FILE_LIST}); run `difflo data download cifar10 "
                    f"--root {root}`, or download cifar-10-python.tar.gz from "
                    f"https://www.cs.toronto.edu/~kriz/cifar.html "
                    f"and extract it into {root}")


def load_cifar10(split="train", root=None, **_) -> ArrayDataset:
    split = check_split("cifar10", split, ("train", "test"))
    root = resolve_root("cifar10", root, FILE_LIST)
    d = batches_dir(root)
    meta_path = d / "batches.meta"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found (it holds the class names); extract cifar-10-python.tar.gz again")
    meta = read_pickle(meta_path)
    names = meta.get("label_names")
    if not names:
        raise DataError(f"{meta_path} has no label_names; is it the CIFAR-10 batches.meta?")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    files = {"train": TRAIN, "test": TEST, "all": TRAIN + TEST}[split]
    images, labels = [], []
    for name in files:
        path = d / name
        if not path.is_file():
            raise DataError(f"{path} not found; CIFAR-10 needs {', '.join(TRAIN + TEST)} in {d}: extract "
                            f"cifar-10-python.tar.gz again")
        batch = read_pickle(path)
        if "data" not in batch or "labels" not in batch:
            raise DataError(f"{path}: no 'data'/'labels' entries; is it a CIFAR-10 python batch?")
        x = np.asarray(batch["data"])
        y = np.asarray(batch["labels"], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' is {x.dtype} {x.shape}, expected uint8 (N, 3072)")
        if len(y) != len(x):
            raise DataError(f"{path}: {len(y):,} labels for {len(x):,} images; the batch is corrupt: extract "
                            f"cifar-10-python.tar.gz again")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{path}: label {int(y.max())} out of range 0..{len(classes) - 1} of {meta_path}")
        images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))      # (N, 32, 32, 3)
        labels.append(y)
    return ArrayDataset(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), len(classes), "cifar10",
                        classes=classes, split=split, source=str(d))
