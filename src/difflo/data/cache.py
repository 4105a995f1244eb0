"""A cache of decoded, resized images, read memory-mapped: training never decodes a JPEG twice and
never holds a whole data set in memory.

One ``.npy`` per (data set, split, size, source files) in ``data.cache_dir`` (default
``$XDG_CACHE_HOME/difflo``, else ``~/.cache/difflo``), named ``<name>-<split>-<size>-<key>.npy``:
uint8 (N, H, W, C), opened with ``numpy.load(mmap_mode="r")``. Indexing it with a batch's indices
copies just those rows into memory (the pages of the rest stay on disk, or in the page cache, which
the kernel may drop). ``key`` is a hash of the recipe (crop box, resize method, channels, format
version) and of every source file's path (made absolute), size and modification time, so editing,
adding or removing a file makes a new entry.

Each entry has a record beside it, ``<same name>.json``: its name, split, size, recipe, source
directory and source file names. A source is (name, split, size, recipe, source directory): two
folders that share a name are two sources. When a build has renamed its entry into place and the
source still hashes to its key, the entries it replaces (same source, another key, per their
records) are removed; a process that has one open keeps reading it (Linux keeps an unlinked file's
data until its last mapping and descriptor close, and ``open_entry`` holds a descriptor that
``take_rows`` reads from), and temporary files are never touched. ``difflo data clean`` removes
what ``stale`` finds: entries without a record, whose source is gone or no longer hashes to their
key, or that a newer entry of the same source replaced.

Building streams: the loader's decoder stores each chunk of decoded images at its own place in a
temporary file in the same directory (``os.pwrite``, not through a mapping, so a full disk is an
``ENOSPC`` error rather than a SIGBUS), so only a few chunks of decoded images are in memory at any
time, whatever the data set's size. The space is checked and reserved (``posix_fallocate``) before
the first image is decoded; the finished file is fsynced and renamed into place (``os.replace``):
a failed or killed build never leaves an entry that would be used. An entry that does not open as
the expected array (truncated, garbage, another image count) is rebuilt. A full disk or an
unwritable directory is one ``DataError`` line naming the space needed and ``data.cache_dir``.
The record is written (atomically) before the entry is renamed into place, so an entry without a
record was made by a difflo from before records (it gets one when it is next opened).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import math
import mmap
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..io import cache_home

FORMAT = 3                 # 3: one .npy, read memory-mapped, built streaming (2: .npz loaded whole)
STALE_S = 3600             # a temporary file untouched this long was left by a killed build: removed
WHERE_ELSE = "set data.cache_dir=DIR (or $XDG_CACHE_HOME)"
RECORD = 1                 # the format of an entry's .json record
ENTRY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*-[0-9a-f]{16}\.(npy|npz|json)")     # .npz: format 2's entries
TEMPORARY = re.compile(r"\.[A-Za-z0-9_][A-Za-z0-9_.-]*-[0-9a-f]{16}\..+\.tmp\.(npy|npz|json)")


def cache_dir_of(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir not in (None, "") else cache_home()


def source_key(files: list[Path], recipe: str) -> str:
    """sha256 over the recipe and each file's path, size and mtime (stat only, no reading)."""
    h = hashlib.sha256(f"difflo-cache-{FORMAT}\n{recipe}\n".encode())
    missing = []
    for f in file_names(files):
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


def file_names(files) -> list[str]:
    """The names ``source_key`` hashes: each path as given, a relative one made absolute (so the key
    does not depend on the working directory)."""
    return [os.fspath(f) if os.path.isabs(f) else os.path.abspath(f) for f in files]


@dataclass
class Plan:
    """What a cache entry holds and how to make it: ``fill(rows)`` stores every image with
    ``rows[lo:hi] = uint8 (hi - lo, H, W, C)`` (in any order, from any thread)."""
    shape: tuple[int, int, int, int]                # (N, H, W, C)
    fill: Callable[["Rows"], None]


def human(n: float) -> str:
    if n < 1e3:
        return f"{n:.0f} bytes"
    return next(f"{n / scale:.1f} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if n >= scale)


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


def record_path(entry: Path) -> Path:
    return entry.with_suffix(".json")


def make_record(name: str, split: str, size, recipe: str, key: str, files, source=None) -> dict:
    """What ``record_path(entry)`` holds (module docstring). ``source``: the source's directory
    (default: the files' common directory). The file names are stored after their common prefix."""
    names = file_names(files)
    prefix = os.path.commonprefix(names)
    prefix = prefix[:prefix.rfind(os.sep) + 1]
    if source is None and prefix:
        source = prefix.rstrip(os.sep) or os.sep
    return {"record": RECORD, "name": name, "split": split, "size": size, "recipe": recipe, "key": key,
            "source": os.path.abspath(source) if source is not None else None, "prefix": prefix,
            "files": [n[len(prefix):] for n in names]}


def source_of(record: dict) -> tuple:
    """What makes two entries' sources the same one (another key is then a newer or older version)."""
    return record["name"], record["split"], record["size"], record["recipe"], record["source"]


def write_record(path: Path, record: dict) -> None:
    """Write ``record`` for the entry ``path`` atomically (a temporary file and a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, separators=(",", ":"))
        os.replace(tmp, record_path(path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict | None:
    """The record of the entry ``path``, or None when it is missing, unreadable or not this entry's."""
    try:
        with open(record_path(path)) as f:
            record = json.load(f)
        ok = (record["record"] == RECORD and isinstance(record["files"], list)
              and entry_path(record["name"], record["split"], record["size"], record["key"], path.parent) == path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if ok else None


HELD: dict[int, int] = {}    # id(the mmap of an opened entry) -> a descriptor of its file, for take_rows


def hold(images: np.memmap) -> None:
    """Keep a descriptor of ``images``' file while its mapping lives: ``take_rows`` reads there, so a
    replaced (unlinked) entry is still read with positional reads, not through the mapping."""
    try:
        fd = os.open(images.filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return                                          # take_rows opens the file by name
    HELD[id(images.base)] = fd
    weakref.finalize(images.base, release, id(images.base), fd)


def release(key: int, fd: int) -> None:
    HELD.pop(key, None)
    os.close(fd)


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
    if complete and isinstance(images.base, mmap.mmap):
        hold(images)
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
    fd = HELD.get(id(images.base))                          # open_entry's descriptor (replaced files too)
    opened = fd is None
    if opened:
        try:
            fd = os.open(images.filename, os.O_RDONLY)
        except OSError:
            return images[idx]                              # deleted while in use: the mapping still has it
    try:
        if os.fstat(fd).st_size != images.offset + images.nbytes:
            return images[idx]                              # not the file that was mapped
        for k in np.argsort(pos, kind="stable"):
            view, at = memoryview(out[k]).cast("B"), int(pos[k])
            while view:
                got = read_at(fd, view, at)
                if not got:
                    raise DataError(f"the decoded-image cache {images.filename} was truncated while in use; "
                                    f"run again (it will be rebuilt)")
                view, at = view[got:], at + got
    finally:
        if opened:
            os.close(fd)
    return out


def read_at(fd: int, view: memoryview, at: int) -> int:
    """Read into ``view`` from offset ``at`` of ``fd`` (no shared file position: thread-safe)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], at)
    data = os.pread(fd, len(view), at)
    view[:len(data)] = data
    return len(data)


def remove_stale(path: Path) -> None:
    """Temporary files of this entry that nothing has written to for STALE_S (a killed build's)."""
    for old in path.parent.glob(f".{path.stem}.*.tmp.*"):                   # the entry's and its record's
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


def build_entry(path: Path, plan: Plan, record: dict | None = None) -> None:
    """Write ``plan``'s images to ``path`` through a temporary file and a rename, and ``record``
    beside it first (module docstring)."""
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
            if record is not None:
                write_record(path, record)
            os.replace(tmp, path)
        except OSError as e:
            raise write_error(e, directory, needed) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if record is not None and not path.is_file():
            record_path(path).unlink(missing_ok=True)
        raise


def remove_replaced(path: Path, record: dict, files) -> None:
    """After ``path`` was built: remove the entries of the same source with another key (their records
    say so), if the source still hashes to this key (else it changed during the build: this entry is
    already outdated). Other data sets, temporary files and entries without a record are left alone;
    a failed removal is left to ``difflo data clean``."""
    try:
        if source_key(files, record["recipe"]) != record["key"]:
            return
    except DataError:
        return
    head = path.name[:-len(f"{record['key']}.npy")]                     # "<name>-<split>-<size>-"
    for other in sorted(path.parent.glob(f"{glob.escape(head)}*.npy")):
        if other == path or not re.fullmatch(r"[0-9a-f]{16}\.npy", other.name[len(head):]):
            continue
        theirs = read_record(other)
        if theirs is not None and source_of(theirs) == source_of(record):
            for p in (other, record_path(other)):
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    break


def cached(name: str, split: str, size, files: list[Path], recipe: str, cache_dir, build: Callable[[], Plan],
           count: int | None = None, source=None) -> tuple[np.ndarray, Path]:
    """The images ``build()`` plans for these files, memory-mapped from the cache (built first when it
    has no complete entry, which then replaces the source's older entries). An entry is complete when
    it holds ``count`` images (default: one per file; archives pass their image count). ``source``:
    the source's directory (default: the files' common directory; see the module docstring)."""
    key = source_key(files, recipe)
    path = entry_path(name, split, size, key, cache_dir)
    count = len(files) if count is None else count
    images = open_entry(path, count)
    if images is None:
        plan = build()
        if plan.shape[0] != count:
            raise RuntimeError(f"{name}: the build plans {plan.shape[0]} images, the entry needs {count}")
        record = make_record(name, split, size, recipe, key, files, source)
        build_entry(path, plan, record)
        images = open_entry(path, count)
        if images is None:
            raise DataError(f"the decoded-image cache {path} was written but does not read back as "
                            f"{count} images; {WHERE_ELSE} to another directory")
        remove_replaced(path, record, files)
    elif not record_path(path).is_file():                     # made before records: it gets one now
        try:
            write_record(path, make_record(name, split, size, recipe, key, files, source))
        except OSError:
            pass                                              # a read-only cache: still read
    return images, path


@dataclass
class Stale:
    """A file of the cache that ``difflo data clean`` removes: its path, bytes and why."""
    path: Path
    size: int
    why: str


def outdated(record: dict | None) -> str | None:
    """Why no current source would use the entry of ``record`` (None: its source still hashes to its key)."""
    if record is None:
        return "no record of its source (made by an older difflo)"
    if record["source"] is not None and not os.path.exists(record["source"]):
        return f"its source {record['source']} is gone"
    try:
        same = source_key([record["prefix"] + f for f in record["files"]], record["recipe"]) == record["key"]
    except DataError:
        same = False
    except (OSError, TypeError, ValueError):
        return "its record cannot be read"
    return None if same else f"its source files in {record['source'] or record['prefix']} changed since"


def stale(cache_dir, everything: bool = False) -> tuple[Path, list[Stale]]:
    """The cache directory and its files that no current source would use (module docstring), or with
    ``everything`` all its entries and records; a killed build's temporary files (untouched for
    STALE_S) either way, never a running build's. Other files there are not the cache's: left alone."""
    directory = cache_dir_of(cache_dir)
    if not directory.exists():
        return directory, []
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise DataError(f"cannot read the decoded-image cache {directory} ({e.strerror or e}); pass --cache-dir "
                        f"DIR (as data.cache_dir) naming the cache directory") from None
    found, newest, current = {}, {}, []         # found: path -> why; newest: source -> (mtime, entry)
    for n in names:
        p = directory / n
        orphan = ENTRY.fullmatch(n) and n.endswith(".json") and not p.with_suffix(".npy").exists()
        if TEMPORARY.fullmatch(n) or orphan:
            try:                                # a record is written just before its entry is renamed into place
                if time.time() - p.stat().st_mtime > STALE_S:
                    found[p] = "a killed build's temporary file" if n[0] == "." else "a record without its entry"
            except OSError:
                pass
        elif not ENTRY.fullmatch(n) or n.endswith(".json"):
            continue                            # not the cache's, or a record (removed with its entry)
        elif n.endswith(".npz"):
            found[p] = "an older cache format (.npz)"
        elif everything:
            found[p] = "every entry (--all)"
        else:
            record = read_record(p)
            why = outdated(record)
            if why is not None:
                found[p] = why
                continue
            try:
                mtime = p.stat().st_mtime_ns
            except OSError:
                continue
            current.append((p, source_of(record)))
            newest[source_of(record)] = max(newest.get(source_of(record), (mtime, p)), (mtime, p))
    for p, source in current:
        if newest[source][1] != p:
            found[p] = f"replaced by {newest[source][1].name}"
    for p in [p for p in found if p.suffix == ".npy"]:
        if record_path(p).exists():
            found[record_path(p)] = f"the record of {p.name}"
    out = []
    for p in sorted(found, key=lambda p: (p.stem, p.suffix == ".json")):       # an entry, then its record
        try:
            out.append(Stale(p, p.stat().st_size, found[p]))
        except OSError:
            pass                                               # removed meanwhile
    return directory, out
