"""Data larger than memory: the decoded-image cache is a .npy that training reads memory-mapped,
built streaming and atomically; bad caches are rebuilt, a full disk or an unwritable directory is
one DataError line."""
import collections
import copy
import errno
import os
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflo import data
from difflo.data import cache, folder, decode
from difflo.errors import DataError
from difflo.train import batch_indices

Usage = collections.namedtuple("Usage", "total used free")       # shutil.disk_usage's fields
SIZE = 64                      # the big folder's images: 64x64x3 = 12 KiB decoded (3 pages)
PER_CLASS, CLASSES = 60, 10    # 600 images, 7.4 MB decoded


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("DIFFLO_DATA", str(tmp_path / "data-home"))


def write_png(path: Path, seed: int, w: int = SIZE, h: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def make_folder(root: Path, per_class: int, classes: int, w: int = SIZE, h: int = SIZE) -> Path:
    for c in range(classes):
        for i in range(per_class):
            write_png(root / f"class{c}" / f"{i:04d}.png", c * 1000 + i, w + i % 3, h)
    return root


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("big") / "imgs", PER_CLASS, CLASSES)


def small(tmp_path) -> Path:
    return make_folder(tmp_path / "imgs", 4, 3, 20, 18)


def load(root, cache_dir, **kw):
    return data.load("folder", "train", root, image_size=kw.pop("image_size", 12), cache_dir=cache_dir, **kw)


def entries(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.npy") if not p.name.startswith(".")) if d.is_dir() else []


def records(d: Path) -> list[Path]:
    return sorted(d.glob("*.json")) if d.is_dir() else []


def leftovers(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.startswith(".")) if d.is_dir() else []


def mapped_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    target, total, current = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                current = len(head) >= 6 and head[5] == target
            elif current and head[:1] == ["Rss:"]:
                total += int(head[1]) * 1024
    return total


# ---------------------------------------------------------------- same batches, fewer bytes

def test_memmap_batches_equal_the_in_memory_ones(tmp_path):
    root = small(tmp_path)
    ds = load(root, tmp_path / "c")
    assert isinstance(ds.images, np.memmap) and not ds.images.flags.writeable
    files = folder.index("train", root)[0]
    mem = data.ArrayDataset(decode.decode_all(files, 12, 3), ds.labels.copy(), ds.num_classes, flip=True)
    ds.flip = True
    assert np.array_equal(ds.images, mem.images) and ds.class_counts().tolist() == mem.class_counts().tolist()
    for step in range(6):                               # the training loop's own batch path
        idx = batch_indices(step, len(ds), 5, seed=3)
        rows = ds.images[idx]
        assert type(rows) is np.ndarray and not np.shares_memory(rows, ds.images)       # an in-memory copy
        x, y = ds.batch(idx, generator=torch.Generator().manual_seed(step))
        x_mem, y_mem = mem.batch(idx, generator=torch.Generator().manual_seed(step))
        assert torch.equal(x, x_mem) and torch.equal(y, y_mem)
    twin = copy.deepcopy(ds)                            # shares the mapping, copies the rest
    assert isinstance(twin.images, np.memmap) and np.shares_memory(twin.images, ds.images)
    assert twin.labels is not ds.labels
    sub, sub_mem = data.first_per_class(twin, 2), data.first_per_class(copy.deepcopy(mem), 2)
    assert np.array_equal(sub.images, sub_mem.images) and sub.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert isinstance(ds.images, np.memmap) and len(ds) == 12                     # the original is untouched
    assert isinstance(data.first_per_class(copy.deepcopy(ds), 4).images, np.memmap)   # every row kept: no copy
    with pytest.raises(DataError, match="per_class=5"):
        data.first_per_class(copy.deepcopy(ds), 5)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
def test_training_batches_copy_their_rows_and_map_nothing(big_folder, tmp_path):
    """The loop's batches come from positional reads of the cache file: nothing stays mapped (the
    kernel can map a 2 MB folio for one 12 KB image read through the mapping), and only the batch
    is allocated (tracemalloc sees numpy's allocations; torch.from_numpy of the whole read-only
    memmap would warn, and warnings are errors here)."""
    whole = load(big_folder, tmp_path / "c", image_size=SIZE).images.nbytes
    path = entries(tmp_path / "c")[0]
    ds = data.from_config(data_config(big_folder, tmp_path / "c", per_class=PER_CLASS, flip=True))  # a fresh map
    assert isinstance(ds.images, np.memmap) and mapped_bytes(path) == 0
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for step in range(4):
                ds.batch(batch_indices(step, len(ds), 8, seed=0), generator=torch.Generator().manual_seed(step))
            ds.class_counts()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < whole / 8 and mapped_bytes(path) == 0
    ds.images[batch_indices(0, len(ds), 8, seed=0)]       # the check can fail: through the mapping, pages stay
    assert mapped_bytes(path) > 0


def test_take_rows_is_fancy_indexing(tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).integers(0, 256, (50, 3, 2, 1), dtype=np.uint8))
    mapped, plain = np.load(tmp_path / "a.npy", mmap_mode="r"), np.load(tmp_path / "a.npy")
    for images in (mapped, mapped[10:], mapped[::2], plain):
        n = len(images)
        for idx in (np.array([3, 0, n - 1, 3]), np.array([-1, -n]), np.arange(n), np.zeros(0, np.int64),
                    np.arange(n) % 2 == 0, np.array([[1, 2], [0, 0]]), np.array([1, 2], np.uint32)):
            got = cache.take_rows(images, idx)
            assert type(got) is np.ndarray and np.array_equal(got, images[idx]) and got.shape == images[idx].shape
        with pytest.raises(IndexError):
            cache.take_rows(images, np.array([n]))


def data_config(root, cache_dir, **kw):
    from difflo.config import DataConfig
    return DataConfig(name="folder", root=str(root), image_size=SIZE, cache_dir=str(cache_dir), **kw)


@pytest.mark.slow
def test_building_holds_a_few_chunks_not_the_data_set(big_folder, tmp_path, monkeypatch):
    """tracemalloc sees numpy's allocations: the streaming build's peak is a few chunk buffers, while
    decoding the same folder into one array (what the cache did before) peaks at its whole size."""
    monkeypatch.setattr(decode, "CHUNK", 8)
    decoded = PER_CLASS * CLASSES * SIZE * SIZE * 3
    tracemalloc.start()
    try:
        ds = load(big_folder, tmp_path / "c", image_size=SIZE)
        streaming = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        whole = decode.decode_all(folder.index("train", big_folder)[0], SIZE, 3)
        in_memory = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(ds.images, whole) and len(ds) == PER_CLASS * CLASSES
    assert in_memory >= decoded                           # the measure sees a whole array
    assert streaming < decoded / 4, (streaming, decoded)


# ---------------------------------------------------------------- built once, rebuilt on change

def test_cache_reused_and_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    root, c = small(tmp_path), tmp_path / "c"
    first = np.array(load(root, c).images)
    assert len(entries(c)) == 1 and entries(c)[0].name.startswith("folder-imgs-train-12-")
    old = entries(c)[0]
    assert records(c) == [old.with_suffix(".json")]
    calls = []
    real = decode.decode
    monkeypatch.setattr(decode, "decode", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = load(root, c)
    assert calls == [] and np.array_equal(again.images, first)                # reused: nothing decoded
    edited = write_png(root / "class1" / "0002.png", 99, 20, 18)
    os.utime(edited, ns=(1, 1))                                                 # a new mtime even within 1 ns
    changed = load(root, c)
    assert len(calls) == 12 and len(entries(c)) == 1 and entries(c) != [old]  # rebuilt into a new entry,
    assert records(c) == [entries(c)[0].with_suffix(".json")]                  # which replaced the old one
    differs = [i for i in range(12) if not np.array_equal(changed.images[i], first[i])]
    assert differs == [6]                                                      # class1/0002 is row 4 + 2
    calls.clear()
    load(root, c, image_size=10)                                               # other options: another entry
    assert len(calls) == 12 and len(entries(c)) == 2 and leftovers(c) == []
    assert cache.FORMAT == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage", "header only", "wrong count", "an npz"])
def test_damaged_entry_is_rebuilt(tmp_path, damage):
    root, c = small(tmp_path), tmp_path / "c"
    expect = np.array(load(root, c).images)
    path = entries(c)[0]
    if damage == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" * 50)
    elif damage == "header only":
        os.truncate(path, 128)
    elif damage == "wrong count":
        np.save(path, expect[:-1])
    else:
        with open(path, "wb") as f:
            np.savez(f, images=expect)
    rebuilt = load(root, c)
    assert isinstance(rebuilt.images, np.memmap) and np.array_equal(rebuilt.images, expect)
    assert entries(c) == [path] and leftovers(c) == []


# ---------------------------------------------------------------- atomic

@pytest.mark.parametrize("when", ["decoding", "renaming", "interrupted"])
def test_failed_build_leaves_no_entry(tmp_path, monkeypatch, when):
    root, c = small(tmp_path), tmp_path / "c"
    real_decode, real_replace, count = decode.decode, os.replace, [0]

    def failing_decode(*a, **k):
        count[0] += 1
        if count[0] == 7:
            raise KeyboardInterrupt if when == "interrupted" else DataError("simulated: image 7 is broken")
        return real_decode(*a, **k)

    if when == "renaming":
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    else:
        monkeypatch.setattr(decode, "decode", failing_decode)
    with pytest.raises((DataError, KeyboardInterrupt)) as e:
        load(root, c)
    assert "\n" not in str(e.value)
    assert entries(c) == [] and leftovers(c) == []             # no entry, no half-written temporary file
    monkeypatch.setattr(decode, "decode", real_decode)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(load(root, c)) == 12 and len(entries(c)) == 1


def test_a_killed_builds_temporary_file_is_never_used_and_removed_when_stale(tmp_path):
    root, c = small(tmp_path), tmp_path / "c"
    expect = np.array(load(root, c).images)
    path = entries(c)[0]
    path.unlink()
    stale, fresh = (c / f".{path.stem}.{tag}.tmp.npy" for tag in ("killed", "running"))
    shutil.copy(__file__, stale)                                # garbage, as a kill leaves it
    shutil.copy(__file__, fresh)
    os.utime(stale, (time.time() - 2 * cache.STALE_S,) * 2)
    assert np.array_equal(load(root, c).images, expect)
    assert not stale.exists() and fresh.exists()               # another build may still be writing that one


# ---------------------------------------------------------------- one clear line

def test_full_disk_while_writing(tmp_path, monkeypatch):
    root, c = small(tmp_path), tmp_path / "c"
    real, calls = os.pwrite, [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(DataError) as e:
        load(root, c)
    msg = str(e.value)
    assert "\n" not in msg and "no space left for the decoded-image cache in" in msg and str(c) in msg
    assert "it needs 5.3 kB" in msg and "set data.cache_dir=DIR" in msg and "$XDG_CACHE_HOME" in msg
    assert entries(c) == [] and leftovers(c) == []


def test_full_disk_found_before_decoding(tmp_path, monkeypatch):
    root, c = make_folder(tmp_path / "imgs", 50, 2, 64, 64), tmp_path / "c"
    monkeypatch.setattr(decode, "decode", lambda *a, **k: pytest.fail("decoded although the disk is full"))
    monkeypatch.setattr(shutil, "disk_usage", lambda d: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DataError, match=r"^no space left .* it needs 1\.2 MB \(1\.0 kB free\); set data.cache_dir"):
        load(root, c, image_size=64)
    assert entries(c) == [] and leftovers(c) == []
    monkeypatch.undo()
    monkeypatch.setattr(decode, "decode", lambda *a, **k: pytest.fail("decoded although the disk is full"))
    monkeypatch.setattr(os, "posix_fallocate",                  # the reservation fails: still no decoding
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DataError, match=r"^no space left .* it needs 1\.2 MB"):
        load(root, c, image_size=64)
    assert entries(c) == [] and leftovers(c) == []


def test_unwritable_cache_dir(tmp_path, monkeypatch):
    root = small(tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DataError) as e:
        load(root, tmp_path / "a-file" / "cache")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"cannot write the decoded-image cache in {tmp_path / 'a-file' / 'cache'} "
                                   f"(Not a directory); set data.cache_dir=DIR")
    c = tmp_path / "c"
    expect = np.array(load(root, c).images)
    monkeypatch.setattr(cache.tempfile, "mkstemp",
                        lambda **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    assert np.array_equal(load(root, c).images, expect)        # a read-only cache with the entry: read
    with pytest.raises(DataError, match=r"cannot write .*\(Permission denied\); set data.cache_dir=DIR .* to a "
                                        r"writable directory"):
        load(root, c, image_size=10)                           # without it: one line


def test_emoji_all_stays_mapped(tmp_path):
    from test_emoji import make_emoji

    root = make_emoji(tmp_path / "emoji")
    every = data.load("emoji", "all", root, cache_dir=tmp_path / "c")
    train = data.load("emoji", "train", root, cache_dir=tmp_path / "c")
    assert isinstance(every.images, np.memmap) and not isinstance(train.images, np.memmap)
    assert len(train) < len(every) and entries(tmp_path / "c") != []


# ---------------------------------------------------------------- replaced entries removed; difflo data clean

def edit(root: Path, seed: int = 99) -> None:
    """A new version of one image of the small folder (a new mtime even within 1 ns)."""
    os.utime(write_png(root / "class1" / "0002.png", seed, 20, 18), ns=(seed, seed))


def test_replacing_an_entry_in_use_keeps_its_reader_reading(tmp_path):
    root, c = small(tmp_path), tmp_path / "c"
    first = np.array(load(root, c).images)                      # (that mapping is closed again)
    ds = load(root, c)                                          # a run reading the entry
    old = entries(c)[0]
    running = c / f".{old.stem}.another-build.tmp.npy"          # a concurrent writer's temporary file
    running.write_bytes(b"being written")
    edit(root)
    new = load(root, c)
    assert len(entries(c)) == 1 and not old.exists() and not old.with_suffix(".json").exists()
    assert records(c) == [entries(c)[0].with_suffix(".json")] and running.exists()
    assert not np.array_equal(new.images, first)
    idx = np.array([6, 0, 11, 6])
    x, y = ds.batch(idx, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, torch.as_tensor(ds.labels[idx]))
    assert np.array_equal(cache.take_rows(ds.images, idx), first[idx])     # read from the unlinked file
    smaps = Path("/proc/self/smaps").is_file()
    assert not smaps or mapped_bytes(old) == 0                              # by its descriptor, not the mapping
    if smaps:                                                               # (the check can fail: without it,
        cache.HELD.pop(id(ds.images.base))                                  # the rows come through the mapping)
        assert np.array_equal(cache.take_rows(ds.images, idx), first[idx]) and mapped_bytes(old) > 0
    assert np.array_equal(ds.images, first)


def plan_of(files: list[Path]):
    """A tiny plan: each file's first byte as a 1x1x1 image."""
    arr = np.array([[[[f.read_bytes()[0]]]] for f in files], dtype=np.uint8)

    def fill(rows):
        rows[0:len(arr)] = arr
    return cache.Plan(arr.shape, fill)


def test_two_sources_with_one_name_keep_their_entries(tmp_path):
    c = tmp_path / "c"
    a, b = small(tmp_path / "a"), small(tmp_path / "b")        # two folders called imgs
    load(a, c), load(b, c)
    a1, b1 = sorted(entries(c), key=lambda p: cache.read_record(p)["source"] != str(a))
    assert cache.read_record(b1)["source"] == str(b)
    assert {a1.name[:-21], b1.name[:-21]} == {"folder-imgs-train-12"}
    edit(a)
    load(a, c)
    assert b1 in entries(c) and a1 not in entries(c) and len(entries(c)) == 2
    edit(b, 98)
    load(b, c)
    assert b1 not in entries(c) and len(entries(c)) == 2 and len(records(c)) == 2
    # one name and one recipe (as celeba's or flowers102's): the source directory tells them apart
    dirs = [tmp_path / d for d in ("x", "y")]
    files = {d: [d / f"{i}.bin" for i in range(3)] for d in dirs}
    for d in dirs:
        d.mkdir()
        for i, f in enumerate(files[d]):
            f.write_bytes(bytes([i + len(d.name)]))
    for d in dirs:
        cache.cached("same", "train", 1, files[d], "one recipe", c, lambda: plan_of(files[d]))
    x1, y1 = sorted((p for p in entries(c) if p.name.startswith("same-")), key=lambda p: cache.read_record(p)["source"])
    files[dirs[0]][0].write_bytes(b"\x07")
    images, x2 = cache.cached("same", "train", 1, files[dirs[0]], "one recipe", c, lambda: plan_of(files[dirs[0]]))
    assert images[0, 0, 0, 0] == 7 and {p for p in entries(c) if p.name.startswith("same-")} == {x2, y1}
    assert cache.read_record(y1)["source"] == str(dirs[1]) and not x1.exists()


def test_data_clean(tmp_path, monkeypatch):
    from conftest import assert_clean_error, run_cli

    c = tmp_path / "c"
    keep_src, gone_src, edited_src, grown_src = (small(tmp_path / n) for n in ("keep", "gone", "edited", "grown"))
    for r in (keep_src, gone_src, edited_src, grown_src):
        load(r, c)
    keep = entries(c)
    shutil.rmtree(gone_src)                                       # the source is gone
    edit(edited_src)                                              # changed, not loaded since
    monkeypatch.setattr(cache, "remove_replaced", lambda *a: None)
    write_png(grown_src / "class0" / "0009.png", 7, 20, 18)      # an image more: a newer entry replaces it
    load(grown_src, c)
    monkeypatch.undo()
    grown = sorted(entries(c), key=lambda p: p.stat().st_mtime_ns)[-1]
    legacy = c / "folder-older-train-12-0123456789abcdef.npy"
    shutil.copy(grown, legacy)                                    # an entry without a record
    npz = c / "folder-imgs-train-12-0123456789abcdef.npz"         # format 2
    npz.write_bytes(b"PK" * 100)
    killed, running = c / f".{legacy.stem}.killed.tmp.npy", c / f".{legacy.stem}.running.tmp.npy"
    for p in (killed, running):
        p.write_bytes(b"x" * 1000)
    os.utime(killed, (time.time() - 2 * cache.STALE_S,) * 2)
    fresh_record = c / "folder-coming-train-12-fedcba9876543210.json"   # a build about to rename its entry
    fresh_record.write_text("{}")
    others = [c / "precision.json", c / "classifiers" / "clf.safetensors", c / "notes.txt"]
    for p in others:
        p.parent.mkdir(exist_ok=True)
        p.write_text("not the data cache's")

    def owner(p):                                                 # which source an entry is of
        rec = cache.read_record(p)
        return rec and Path(rec["source"]).parent.name              # .../NAME/imgs
    stale = {p: owner(p) for p in entries(c) if owner(p) in ("gone", "edited", None)}
    stale |= {p: "grown" for p in entries(c) if owner(p) == "grown" and p != grown}
    assert sorted(stale.values(), key=str) == sorted(["gone", "edited", "grown", None], key=str)
    expect = sorted([*stale, *(p.with_suffix(".json") for p in stale if p != legacy), npz, killed])
    freed = sum(p.stat().st_size for p in expect)
    before = sorted(c.rglob("*"))

    code, out, err = run_cli("data", "clean", "--cache-dir", c, "--dry-run")
    assert code == 0 and err == "" and sorted(c.rglob("*")) == before          # only listed
    lines = out.splitlines()
    assert sorted(Path(line.split()[2]) for line in lines[:-1]) == expect and all(
        line.startswith("would remove ") for line in lines[:-1])
    assert lines[-1].startswith("would free ") and f"({freed:,} bytes) in {c}" in lines[-1]
    said = dict((line.split()[2], line) for line in lines[:-1])
    assert "is gone" in said[str(next(p for p, o in stale.items() if o == "gone"))]
    assert "changed since" in said[str(next(p for p, o in stale.items() if o == "edited"))]
    assert f"replaced by {grown.name}" in said[str(next(p for p, o in stale.items() if o == "grown"))]
    assert "no record" in said[str(legacy)] and "older cache format" in said[str(npz)]

    code, out, err = run_cli("data", "clean", "--cache-dir", c)
    assert code == 0 and err == "" and out.splitlines()[-1].startswith("freed ") and f"({freed:,} bytes)" in out
    assert sorted(Path(line.split()[1]) for line in out.splitlines()[:-1]) == expect
    left = sorted(c.rglob("*"))
    assert not any(p.exists() for p in expect) and left == sorted(set(before) - set(expect))
    assert {p for p in entries(c)} == {p for p in keep if owner(p) == "keep"} | {grown}
    assert running.exists() and fresh_record.exists() and all(p.exists() for p in others)
    assert run_cli("data", "clean", "--cache-dir", c)[1].startswith("nothing to remove in ")
    real = decode.decode
    monkeypatch.setattr(decode, "decode", lambda *a, **k: pytest.fail("a current entry was removed"))
    load(keep_src, c), load(grown_src, c)
    monkeypatch.setattr(decode, "decode", real)

    real_unlink = Path.unlink                                    # a file that cannot be removed: one line

    def unlink(self, *a, **k):
        if self.suffix == ".npy":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(Path, "unlink", unlink)
    code, out, err = run_cli("data", "clean", "--cache-dir", c, "--all")
    assert_clean_error(code, err, "could not remove 2 of 4 files", "Permission denied", str(c))
    assert len(entries(c)) == 2 and all(p.with_suffix(".json").exists() for p in entries(c))  # kept with them
    monkeypatch.setattr(Path, "unlink", real_unlink)
    code, out, err = run_cli("data", "clean", "--cache-dir", c, "--all")
    assert code == 0 and entries(c) == [] and records(c) == sorted([fresh_record, others[0]])
    assert running.exists() and all(p.exists() for p in others)

    (tmp_path / "a-file").write_text("")
    code, out, err = run_cli("data", "clean", "--cache-dir", tmp_path / "a-file")
    assert_clean_error(code, err, "cannot read the decoded-image cache", "Not a directory", "--cache-dir")
