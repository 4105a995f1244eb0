"""A cache of decoded, resized images, so training never decodes a JPEG twice.

One uncompressed ``.npz`` per (data set, split, size, source files) in ``data.cache_dir``
(default ``~/.cache/difflo``), named ``<name>-<split>-<size>-<key>.npz``. ``key`` is a hash of
the recipe (crop box, resize method, channels, format version) and of every source file's path,
size and modification time, so editing, adding or removing a file makes a new entry. Written to
a temporary file in the same directory and renamed into place (``os.replace``): a killed run
never leaves a half-written cache. An unreadable cache entry is rebuilt; an unwritable cache
directory only costs the re-decoding next time (with a warning).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..io import cache_home

FORMAT = 2                 # 2: transparency composited over data.background (1 dropped alpha)


def cache_dir_of(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir not in (None, "") else cache_home()


def source_key(files: list[Path], recipe: str) -> str:
    """sha256 over the recipe and each file's path, size and mtime (stat only, no reading)."""
    h = hashlib.sha256(f"difflo-cache-{FORMAT}\n{recipe}\n".encode())
    missing = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            missing.append(f)
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if missing:
        raise DataError(f"{missing[0]} is missing ({len(missing)} of {len(files)} image files listed are missing); "
                        f"extract the complete archive again")
    return h.hexdigest()[:16]


def cached(name: str, split: str, size, files: list[Path], recipe: str, cache_dir,
           build: Callable[[], dict[str, np.ndarray]], count: int | None = None) -> tuple[dict[str, np.ndarray], Path]:
    """The arrays ``build()`` makes for these files, from the cache when it has them. An entry is
    complete when it holds ``count`` images (default: one per file; archives pass their image count)."""
    key = source_key(files, recipe)
    directory = cache_dir_of(cache_dir)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    path = directory / f"{name}-{split}-{size if size is not None else 'native'}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if len(arrays.get("images", ())) == (len(files) if count is None else count):
                return arrays, path
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass                                          # unreadable: rebuild it below
    arrays = build()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Not io.atomic_path: its temporary name is fixed, and the torchrun ranks (or two runs) that build
        # the same entry at once would write into one file; mkstemp gives each writer its own.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npz", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        warnings.warn(f"could not write the decoded-image cache {path} ({e.strerror}); the images will be decoded "
                      f"again next time (set data.cache_dir to a writable directory)", stacklevel=3)
    return arrays, path
