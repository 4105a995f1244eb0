"""benchmarks/pack_emoji64.py: the emoji splits configs/emoji64.yaml trains on, packed into one file that a
lent GPU machine (no network, so no `difflo data download emoji` there) can read.

    .venv/bin/python benchmarks/pack_emoji64.py          # writes gpu-data/emoji64.npz (~20 MB; git-ignored)

The device tool then carries it: run(carry=["gpu-data"], command="SECTIONS=emoji64 bash benchmarks/gpu.sh").

Conventions: the splits are read with the config's own data options (image size, label, styles,
background), so the packed images are the ones ``difflo train configs/emoji64.yaml`` would see (no flips:
the config has none). The file holds ``KEYS``: per split ``{split}_images`` uint8 (N, H, W, 3) and
``{split}_labels`` int64 (N,), and ``classes`` (str, one per class; the same for both splits), written
with ``np.savez_compressed`` (no pickles). ``load_packed`` reads one split back as an ``ArrayDataset``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))          # difflo from this checkout, as benchmarks/gpu.sh runs it

from difflo import config as config_mod, data  # noqa: E402
from difflo.errors import DataError, DiffloError  # noqa: E402
from difflo.io import atomic_path  # noqa: E402

CONFIG = ROOT / "configs" / "emoji64.yaml"
DEFAULT_OUT = ROOT / "gpu-data" / "emoji64.npz"
SPLITS = ("train", "test")
KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels")) + ("classes",)


def pack(out: str | Path = DEFAULT_OUT, config: str | Path = CONFIG) -> dict:
    """Write the config's train and test splits to ``out``; returns the number of images per split."""
    cfg = config_mod.load(config)
    arrays, classes = {}, None
    for split in SPLITS:
        ds = data.load_split(cfg.data, split)
        if classes is not None and tuple(ds.classes) != classes:
            raise DataError(f"{cfg.data.name}: the {split} split names other classes than the train split; "
                            f"re-fetch the data set with `difflo data download {cfg.data.name}`")
        classes = tuple(ds.classes)
        arrays[f"{split}_images"] = np.asarray(ds.images, dtype=np.uint8)
        arrays[f"{split}_labels"] = np.asarray(ds.labels, dtype=np.int64)
    arrays["classes"] = np.array(classes, dtype=str)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        np.savez_compressed(tmp, **arrays)
    return {split: len(arrays[f"{split}_labels"]) for split in SPLITS}


def load_packed(path: str | Path, split: str = "train") -> data.ArrayDataset:
    """One split of a file ``pack`` wrote, as an ArrayDataset named ``emoji`` (its class names kept)."""
    path = Path(path)
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not packed; choose one of {', '.join(SPLITS)}")
    if not path.is_file():
        raise DataError(f"{path} not found; write it with `python benchmarks/pack_emoji64.py` on a machine that "
                        f"has the emoji files, and carry it (carry gpu-data)")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in KEYS if k not in npz.files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}; rewrite it with `python benchmarks/pack_emoji64.py`")
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].astype(np.int64)
        classes = tuple(str(c) for c in npz["classes"])
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise DataError(f"{path}: {split}_images must be uint8 (N, H, W, C) with one label each; got "
                        f"{images.dtype} {images.shape} and {len(labels)} labels; rewrite it with pack_emoji64.py")
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
        raise DataError(f"{path}: {split}_labels run outside the {len(classes)} classes; rewrite it with pack_emoji64.py")
    return data.ArrayDataset(images, labels, len(classes), name="emoji", classes=classes, split=split,
                             source=str(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the .npz to write (default gpu-data/emoji64.npz)")
    p.add_argument("--config", default=str(CONFIG), help="whose data section to pack (default configs/emoji64.yaml)")
    args = p.parse_args(argv)
    if not args.out.endswith(".npz"):
        p.error(f"--out {args.out}: must end in .npz")
    try:
        counts = pack(args.out, args.config)
    except DiffloError as e:
        print(f"pack_emoji64: error: {e}", file=sys.stderr)
        return 2
    size = Path(args.out).stat().st_size / 2**20
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" images ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
