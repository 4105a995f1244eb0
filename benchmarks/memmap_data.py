#!/usr/bin/env python
"""Data larger than memory: difflo's memory-mapped image cache against an in-memory array.

    python benchmarks/memmap_data.py                          # N = 100,000 32x32 PNGs, in a temporary folder
    python benchmarks/memmap_data.py --n 2000                 # a quick check
    python benchmarks/memmap_data.py --dir /data/bench100k    # keep the folder (reused while it holds N images)

Makes an image folder of N small RGB PNGs in 10 class subfolders (smooth random colour fields),
then runs every variant in a fresh process (peak RSS is VmHWM of that process; ru_maxrss would
carry the parent's peak over fork and exec) and prints a markdown table:

- build, streaming (difflo): ``data.load`` of the folder into an empty cache directory: index,
  probe the headers, decode chunk by chunk straight into the ``.npy`` (``cache.py``).
- build, in memory (before): decode the same files into one array, then write it with ``np.savez``
  (what the cache did before it was memory-mapped).
- read, in memory: load the whole cached array into RAM, then the training loop's batches.
- read, memmap indexing: the batches by fancy indexing the memory-mapped array (pages stay mapped).
- read, difflo: ``ArrayDataset.batch`` on the memory-mapped set (positional reads of its rows).
- baseline: the same loop over a data set of only 64 images in memory (imports, torch, the batch
  tensors): subtract its RSS from the others'.

Batches are those of ``difflo train``: 64 images, indices from ``train.batch_indices`` (a seeded
permutation per epoch), random flips, converted to float tensors in [-1, 1]. The page cache is warm
(the build has just written the file); nothing here drops the machine's caches.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from timing import child_json  # noqa: E402

CLASSES = 10
VARIANTS = {                       # name: what the row says
    "baseline": "baseline: the same batches from a set of 64 images in memory",
    "build-stream": "build, streaming (difflo): index, probe, decode into the .npy",
    "build-memory": "build, in memory (before): decode into one array, np.savez",
    "read-memory": "read, in memory: the whole array loaded, then batches",
    "read-mapped": "read, memmap indexing: batches through the mapping",
    "read-difflo": "read, difflo: ArrayDataset.batch (positional reads)",
}


def status() -> dict:
    """VmHWM (peak), RssAnon and RssFile of this process in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def make_folder(root: Path, n: int, size: int) -> Path:
    """n PNGs of size x size RGB in class0..class9 (an existing folder with n images is reused)."""
    import numpy as np
    from PIL import Image

    if root.is_dir() and sum(1 for _ in root.rglob("*.png")) == n:
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % CLASSES}"
        if i < CLASSES:
            d.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)          # a smooth colour field, like a photo
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        img.save(d / f"{i:07d}.png")
    return root


def batches(ds, n_batches: int, batch: int) -> float:
    """Seconds for the training loop's first n_batches batches of ds (index, read, flip, float)."""
    import torch
    from difflo.train import batch_indices

    t0 = time.perf_counter()
    for step in range(n_batches):
        gen = torch.Generator().manual_seed(step)
        x, _ = ds.batch(batch_indices(step, len(ds), batch, seed=0), "cpu", gen)
    return time.perf_counter() - t0


def child(a) -> dict:
    import numpy as np
    import torch  # noqa: F401  (every variant pays the same imports)
    from difflo import data
    from difflo.data import folder, decode

    res: dict = {}
    load = lambda: data.load("folder", "train", a.folder, image_size=a.size, cache_dir=a.cache)   # noqa: E731
    if a.child == "build-stream":
        t0 = time.perf_counter()
        ds = load()
        res["time"] = time.perf_counter() - t0
        res["bytes"] = ds.images.nbytes
    elif a.child == "build-memory":
        t0 = time.perf_counter()
        files = folder.index("train", a.folder)[0]
        modes, sizes = zip(*(decode.probe(f) for f in files))         # as the folder loader did
        images = decode.decode_all(files, a.size, 3 if set(modes) - set(decode.GRAY_MODES) else 1)
        with open(Path(a.cache) / "in-memory.npz", "wb") as f:
            np.savez(f, images=images)
        res["time"] = time.perf_counter() - t0
    elif a.child == "baseline":
        rng = np.random.default_rng(0)
        ds = data.ArrayDataset(rng.integers(0, 256, (a.batch, a.size, a.size, 3), dtype=np.uint8),
                               np.zeros(a.batch, np.int64), 0, flip=True)
        res["time"] = batches(ds, a.batches, a.batch)
        res["images_per_s"] = a.batches * a.batch / res["time"]
    elif a.child.startswith("read-"):
        t0 = time.perf_counter()
        ds = load()
        if a.child == "read-memory":
            ds.images = np.array(ds.images)                   # the whole array in RAM
        elif a.child == "read-mapped":
            ds.images = ds.images[:]      # a view of the memmap: ArrayDataset.batch falls back to images[idx]
        res["open"] = time.perf_counter() - t0
        ds.flip = True
        res["time"] = batches(ds, a.batches, a.batch)
        res["images_per_s"] = a.batches * a.batch / res["time"]
    return {**res, **status()}


def run_child(variant: str, a, folder_dir: Path, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--folder", str(folder_dir), "--cache", str(cache),
           "--size", str(a.size), "--batches", str(a.batches), "--batch", str(a.batch)]
    return child_json(cmd, variant)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="images in the folder (default 100,000)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    ap.add_argument("--dir", help="make (or reuse) the image folder here (default: a temporary folder)")
    ap.add_argument("--batches", type=int, default=300, help="training batches read per variant (default 300)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return 0

    from difflo import precision

    with tempfile.TemporaryDirectory(prefix="difflo-memmap-") as tmp:
        tmp = Path(tmp)
        folder_dir = Path(a.dir) if a.dir else tmp / "images"
        t0 = time.perf_counter()
        make_folder(folder_dir, a.n, a.size)
        made = time.perf_counter() - t0
        cache, scratch = tmp / "cache", tmp / "scratch"
        cache.mkdir()
        scratch.mkdir()
        rows = {"baseline": run_child("baseline", a, folder_dir, cache),
                "build-stream": run_child("build-stream", a, folder_dir, cache),      # fills the cache
                "build-memory": run_child("build-memory", a, folder_dir, scratch)}
        for v in ("read-memory", "read-mapped", "read-difflo"):
            rows[v] = run_child(v, a, folder_dir, cache)

    decoded = rows["build-stream"]["bytes"]
    print(f"# difflo data larger than memory: memory-mapped cache vs in-memory array, {time.strftime('%Y-%m-%d')}")
    print(f"CPU: {precision.cpu_model()}, {os.cpu_count()} CPUs. N = {a.n:,} PNGs of {a.size}x{a.size}x3 in "
          f"{CLASSES} class folders (decoded {decoded / 1e6:,.1f} MB; folder made in {made:.0f} s). Reads: "
          f"{a.batches} batches of {a.batch} (seeded permutation, flips, float), page cache warm. RSS in MB: "
          f"VmHWM is the peak of the whole process; RssAnon/RssFile at its end (RssFile: file pages mapped).")
    print()
    print("| variant | open s | time s | images/s | peak RSS (VmHWM) | RssAnon | RssFile |")
    print("|---|---|---|---|---|---|---|")
    for v, r in rows.items():
        ips = f"{r['images_per_s']:,.0f}" if "images_per_s" in r else (
            f"{a.n / r['time']:,.0f} (decode)" if v.startswith("build") else "")
        print(f"| {VARIANTS[v]} | {r['open']:.2f} | " if "open" in r else f"| {VARIANTS[v]} | | ", end="")
        print(f"{r['time']:.2f} | {ips} | " if "time" in r else "| | ", end="")
        print(f"{r['VmHWM']:,.0f} | {r['RssAnon']:,.0f} | {r['RssFile']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
