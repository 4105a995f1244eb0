"""A cache of decoded, resized images, read memory-mapped: training never decodes a JPEG twice and
never holds a whole data set in memory.

One ``.npy`` per (data set, split, size, source files) in ``data.cache_dir`` (default
``$XDG_CACHE_HOME/difflo``, else ``~/.cache/difflo``), named ``<name>-<split>-<size>-<key>.npy``:
uint8 (N, H, W, C), opened with ``numpy.load(mmap_mode="r")``. Indexing it with a batch's indices
copies just those rows into memory (the pages of the rest stay on disk, or in the page cache, which
the kernel may drop). ``key`` is a hash of the recipe (crop box, resize method, channels, format
version) and of every source file's path, size and modification time, so editing, adding or
removing a file makes a new entry.

Building streams: the loader's decoder stores each chunk of decoded images at its own place in a
temporary file in the same directory (``os.pwrite``, not through a mapping, so a full disk is an
``ENOSPC`` error rather than a SIGBUS), so only a few chunks of decoded images are in memory at any
time, whatever the data set's size. The space is checked and reserved (``posix_fallocate``) before
the first image is decoded; the finished file is fsynced and renamed into place (``os.replace``):
a failed or killed build never leaves an entry that would be used. An entry that does not open as
the expected array (truncated, garbage, another image count) is rebuilt. A full disk or an
unwritable directory is one ``DataError`` line naming the space needed and ``data.cache_dir``.
"""
from __future__ import annotations

import errno
import hashlib
import io
import math
import mmap
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..io import cache_home

FORMAT = 3                 # 3: one .npy, read memory-mapped, built streaming (2: .npz loaded whole)
STALE_S = 3600             # a temporary file untouched this long was left by a killed build: removed
WHERE_ELSE = "set data.cache_dir=DIR (or $XDG_CACHE_HOME)"


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


@dataclass
class Plan:
    """What a cache entry holds and how to make it: ``fill(rows)`` stores every image with
    ``rows[lo:hi] = uint8 (hi - lo, H, W, C)`` (in any order, from any thread)."""
    shape: tuple[int, int, int, int]                # (N, H, W, C)
    fill: Callable[["Rows"], None]


def human(n: float) -> str:
    return next(f"{n / scale:.1f} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes"))
                if n >= scale or unit == "bytes")


def write_error(e: OSError, directory: Path, needed: int) -> DataError:
    """The one line for an OSError while writing an entry of ``needed`` bytes into ``directory``."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{human(shutil.disk_usage(directory).free)} free"
        except OSError:
            free = "free space unknown"
        return DataError(f"no space left for the decoded-image cache in {directory}: it needs {human(needed)} "
                         f"({free}); {WHERE_ELSE} to a directory on a disk with room")
    return DataError(f"cannot write the decoded-image cache in {directory} ({e.strerror or e}); {WHERE_ELSE} "
                     f"to a writable directory")


class Rows:
    """The rows of a ``.npy`` being built, written in place with ``os.pwrite`` (thread-safe):
    ``rows[lo:hi] = images``. Only ``shape`` and slice assignment, like a write-only array."""

    def __init__(self, fd: int, offset: int, shape: tuple[int, ...], directory: Path, needed: int):
        self.fd, self.offset, self.shape = fd, offset, tuple(shape)
        self.row_bytes = math.prod(self.shape[1:])
        self.directory, self.needed = directory, needed
        self.written = 0                             # rows stored so far (a build must store all)
        self.lock = threading.Lock()

    def __setitem__(self, key: slice, images: np.ndarray) -> None:
        lo, hi, step = key.indices(self.shape[0])
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if step != 1 or images.shape != (hi - lo, *self.shape[1:]):
            raise ValueError(f"rows[{lo}:{hi}:{step}] cannot take an array of shape {images.shape}")
        view, pos = memoryview(images).cast("B"), self.offset + lo * self.row_bytes
        try:
            while view:                              # pwrite may write less than asked (then ENOSPC)
                n = os.pwrite(self.fd, view, pos)
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view, pos = view[n:], pos + n
        except OSError as e:
            raise write_error(e, self.directory, self.needed) from None
        with self.lock:
            self.written += hi - lo


def entry_path(name: str, split: str, size, key: str, cache_dir) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return cache_dir_of(cache_dir) / f"{name}-{split}-{size if size is not None else 'native'}-{key}.npy"


def open_entry(path: Path, count: int) -> np.ndarray | None:
    """The entry memory-mapped read-only, or None when it is missing or not a complete uint8
    (count, H, W, C) array (truncated, garbage, another count: the caller rebuilds it)."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(images, np.ndarray):          # an .npz archive under this name
        images.close()
        return None
    complete = (isinstance(images, np.memmap) and images.dtype == np.uint8 and images.ndim == 4
                and len(images) == count and images.offset + images.nbytes == os.path.getsize(path))
    return images if complete else None


def take_rows(images: np.ndarray, idx) -> np.ndarray:
    """``images[idx]`` as a new in-memory array. From an entry opened by ``open_entry`` (a read-only,
    C-ordered np.memmap of a whole .npy) the rows are read from its file with positional reads, in
    file order, instead of through the mapping: pages touched through a mapping stay mapped and count
    in the process's resident memory until the kernel reclaims them (and it maps whole large folios:
    one 12 kB image mapped 2 MB here), so random batches grow RSS to the file's size within an epoch.
    Read this way they are only page cache. The same bytes either way; anything else is indexed."""
    idx = np.asarray(idx)
    whole = (isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap) and images.filename
             and not images.flags.writeable and images.flags.c_contiguous and images.ndim >= 2)
    if not whole or idx.ndim != 1 or idx.dtype.kind not in "iu":
        return images[idx]
    n, row = len(images), images.strides[0]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        return images[idx]                                  # numpy's IndexError
    out = np.empty((len(idx), *images.shape[1:]), dtype=images.dtype)
    pos = images.offset + np.where(idx < 0, idx + n, idx).astype(np.int64) * row
    try:
        f = open(images.filename, "rb", buffering=0)
    except OSError:
        return images[idx]                                  # deleted while in use: the mapping still has it
    with f:
        if os.fstat(f.fileno()).st_size != images.offset + images.nbytes:
            return images[idx]                              # not the file that was mapped
        for k in np.argsort(pos, kind="stable"):
            view = memoryview(out[k]).cast("B")
            f.seek(int(pos[k]))
            while view:
                got = f.readinto(view)
                if not got:
                    raise DataError(f"the decoded-image cache {images.filename} was truncated while in use; "
                                    f"run again (it will be rebuilt)")
                view = view[got:]
    return out


def remove_stale(path: Path) -> None:
    """Temporary files of this entry that nothing has written to for STALE_S (a killed build's)."""
    for old in path.parent.glob(f".{path.stem}.*.tmp.npy"):
        try:
            if time.time() - old.stat().st_mtime > STALE_S:
                old.unlink()
        except OSError:
            pass


def reserve(fd: int, length: int) -> None:
    """Allocate the file's blocks now, so a full disk fails before decoding, not hours into it."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):    # the filesystem cannot: the
            raise                                                            # writes report a full disk


def build_entry(path: Path, plan: Plan) -> None:
    """Write ``plan``'s images to ``path`` through a temporary file and a rename (module docstring)."""
    directory = path.parent
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": tuple(plan.shape)})
    head = head.getvalue()
    needed = len(head) + math.prod(plan.shape)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as e:
        raise write_error(e, directory, needed) from None
    remove_stale(path)
    if needed > free:
        raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), directory, needed)
    # Not io.atomic_path: its temporary name is fixed, and the torchrun ranks (or two runs) that build
    # the same entry at once would write into one file; mkstemp gives each writer its own.
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npy", dir=directory)
    except OSError as e:
        raise write_error(e, directory, needed) from None
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                f.write(head)
                f.flush()
                reserve(f.fileno(), needed)
            except OSError as e:
                raise write_error(e, directory, needed) from None
            rows = Rows(f.fileno(), len(head), plan.shape, directory, needed)
            plan.fill(rows)
            if rows.written != plan.shape[0]:
                raise RuntimeError(f"the cache build stored {rows.written} of {plan.shape[0]} images")
            try:
                os.fsync(f.fileno())
            except OSError as e:
                raise write_error(e, directory, needed) from None
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise write_error(e, directory, needed) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached(name: str, split: str, size, files: list[Path], recipe: str, cache_dir, build: Callable[[], Plan],
           count: int | None = None) -> tuple[np.ndarray, Path]:
    """The images ``build()`` plans for these files, memory-mapped from the cache (built first when it
    has no complete entry). An entry is complete when it holds ``count`` images (default: one per
    file; archives pass their image count)."""
    path = entry_path(name, split, size, source_key(files, recipe), cache_dir)
    count = len(files) if count is None else count
    images = open_entry(path, count)
    if images is None:
        plan = build()
        if plan.shape[0] != count:
            raise RuntimeError(f"{name}: the build plans {plan.shape[0]} images, the entry needs {count}")
        build_entry(path, plan)
        images = open_entry(path, count)
        if images is None:
            raise DataError(f"the decoded-image cache {path} was written but does not read back as "
                            f"{count} images; {WHERE_ELSE} to another directory")
    return images, path
