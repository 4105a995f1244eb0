"""Small file infrastructure every layer shares: atomic writes, the cache folder, writable checks, plots.

* :func:`atomic_path` is the one write-temp-then-rename sequence: code writes to the temporary path it
  yields (same folder, same suffix, so savers that infer the format from the name work); on success
  it is renamed over the target, on any error (disk full, a second Ctrl-C) it is removed. A kill
  never leaves half a file under the real name.
* :func:`atomic_dir` is the same for a directory (a checkpoint, RUN/best, an exported model): it is
  built as ``.tmp-NAME`` beside the target and renamed into place; an existing target is first
  renamed aside to ``.tmp-del-NAME`` (:func:`discard_dir` deletes a directory the same way), so the
  target is at every moment the whole old directory, the whole new one, or (a kill between the two
  renames) absent, never a mix. What a kill leaves is ``.tmp-*``, removed by the next write.
* :func:`cache_home` honours ``$XDG_CACHE_HOME`` (``~/.cache`` otherwise): data caches, downloaded
  data sets and trained classifiers all live under it.
* :func:`pyplot` gives matplotlib's pyplot with the non-interactive Agg backend (no display needed).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

from .errors import DiffloError


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path`` (``.NAME.tmp.SUFFIX``); rename it onto ``path`` on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a new empty directory beside ``target`` (``.tmp-NAME``, a leftover of a killed write
    removed first) for the caller to fill; on success rename it onto ``target`` (an existing
    ``target`` is renamed aside to ``.tmp-del-NAME`` first and removed after), then sync the parent
    folder; on any error (disk full, a second Ctrl-C) remove it and leave ``target`` as it was."""
    target = Path(target)
    tmp, aside = target.with_name(f".tmp-{target.name}"), target.with_name(f".tmp-del-{target.name}")
    for stale in (tmp, aside):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        replaced = target.exists()
        if replaced:
            os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            if replaced:
                os.replace(aside, target)             # put the old one back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(target.parent)


def discard_dir(path: str | Path) -> None:
    """Remove a directory so that no half-deleted copy is ever visible under its name: rename it to
    ``.tmp-del-NAME`` beside it first (all a kill can leave), then delete that."""
    path = Path(path)
    doomed = path.with_name(f".tmp-del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename into it) durable, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_digest(path: str | Path, algorithm: str):
    """The ``hashlib`` object of ``algorithm`` ("sha256", "sha512", "md5") over a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def cache_home() -> Path:
    """$XDG_CACHE_HOME/difflo, else ~/.cache/difflo."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "difflo"


def check_writable(directory: str | Path, what: str = "run directory", fix: str = "choose another --out") -> Path:
    """Create ``directory`` if needed and prove a file can be written there, else one clear error."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DiffloError(f"cannot write to {what} {directory}: {e.strerror}; {fix}") from None
    return directory


def check_out_file(path: str | Path, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    """An output file the user named: the right suffix, not a folder, and its folder writable."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise DiffloError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise DiffloError(f"{flag} {path} is a directory; give a file name ending in {' or '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DiffloError(f"cannot write {flag} {path}: {e.strerror}") from None
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
