"""What every loader shares: the array data set, the registry entry, roots and splits."""
from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import DataError
from ..io import cache_home
from .cache import take_rows

if TYPE_CHECKING:                       # torch is imported lazily: `difflo data info` starts fast
    import torch


@dataclass
class ArrayDataset:
    """Images and labels. ``images`` is in memory, or (decoded image files) a read-only ``np.memmap``
    of the cache (``cache.py``): a batch, a class's rows or a subset copies only its own rows (a
    batch reads them from the file, so they are not left mapped: ``cache.take_rows``)."""
    images: np.ndarray          # uint8 (N, H, W, C); possibly memory-mapped, read-only
    labels: np.ndarray          # int64 (N,); all 0 when num_classes == 0
    num_classes: int            # 0 = unconditional
    name: str = ""
    flip: bool = False          # random horizontal flips in batch()
    classes: tuple[str, ...] = ()   # class names, len == num_classes
    split: str = ""
    source: str = ""            # where the images were read from (a directory, or "embedded")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    def batch(self, idx, device="cpu", generator: "torch.Generator | None" = None
              ) -> "tuple[torch.Tensor, torch.Tensor]":
        """Images (B, C, H, W) in [-1, 1] and labels (B,) for the given indices; with ``flip`` set
        and a generator given, each image is mirrored left-right with probability 1/2."""
        import torch                  # here, so that `difflo data ...` and --help start fast

        idx = np.asarray(idx)
        rows = take_rows(self.images, idx)               # (B, H, W, C) uint8 in memory: only these rows are read
        x = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        # (B, C, H, W), contiguous: a permuted view would carry the channels_last layout into every layer
        # (oneDNN keeps its input's layout), where GroupNorm runs 2-8x slower than on contiguous maps
        x = x.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0
        y = torch.from_numpy(np.ascontiguousarray(self.labels[idx])).to(device)
        if self.flip and generator is not None:
            mirror = torch.rand(len(y), generator=generator, device=generator.device) < 0.5
            x = torch.where(mirror.to(device)[:, None, None, None], x.flip(3), x)
        return x, y

    def class_counts(self) -> np.ndarray:
        """Images per class (length max(num_classes, 1))."""
        return np.bincount(self.labels, minlength=max(self.num_classes, 1))

    def __deepcopy__(self, memo) -> "ArrayDataset":
        """A deep copy that shares read-only images (a memory-mapped cache) instead of reading them
        all into memory; everything else, and writable images, are copied."""
        new = copy.copy(self)
        memo[id(self)] = new
        for name, value in vars(self).items():
            if not (name == "images" and isinstance(value, np.ndarray) and not value.flags.writeable):
                setattr(new, name, copy.deepcopy(value, memo))
        return new


@dataclass
class DatasetSpec:
    """A registry entry: ``spec(split=..., root=..., image_size=..., cache_dir=..., **options)`` loads.

    ``options`` names the data-set options (``DATA_OPTIONS``) this loader reads; ``load`` refuses a
    non-default value for any other, and a ``cache_dir`` unless it is ``cached``, so a setting never
    silently does nothing."""
    name: str
    loader: Callable[..., ArrayDataset]
    splits: tuple[str, ...]               # the real splits ("all" is their union where supported)
    description: str = ""
    files: str = ""                       # the files it reads, for messages and `difflo data info`
    aliases: dict[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()        # the DATA_OPTIONS it reads
    licence: str = ""                     # licences and attribution, printed by `difflo data info`
    native_size: int | None = None        # the size of the stored images (None: decoded, resized)

    @property
    def cached(self) -> bool:
        """Whether it uses the decoded-data cache (``cache.py``, in ``data.cache_dir``): the data sets of
        image files (no ``native_size``) are decoded and resized once into it; the others read their
        arrays as stored, so ``load`` refuses a ``cache_dir`` for them."""
        return self.native_size is None

    def __call__(self, split: str = "train", root=None, image_size: int | None = None, cache_dir=None,
                 **options) -> ArrayDataset:
        return self.loader(split=split, root=root, image_size=image_size, cache_dir=cache_dir,
                           **{k: v for k, v in options.items() if k in self.options})


# Options beyond name/root/split/image_size that some loaders read, with their defaults (DataConfig's).
DATA_OPTIONS: dict[str, object] = {
    "attribute": None,         # celeba: condition on this attribute
    "background": "white",     # files with transparency: composited over this colour (difflo.images)
    "label": None,             # emoji: subcategory | category
    "styles": None,            # emoji: which image sets (google, twitter)
}


def check_split(name: str, split: str, splits, aliases: dict[str, str] | None = None, all_ok: bool = True) -> str:
    """The canonical split name, or DataError naming the valid ones."""
    aliases = aliases or {}
    split = aliases.get(split, split)
    valid = list(splits) + (["all"] if all_ok else [])
    if split not in valid:
        close = difflib.get_close_matches(str(split), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"{name} has no split {split!r}: choose one of {', '.join(valid)}{hint}")
    return split


def data_home() -> Path:
    """Where `difflo data download` puts data sets by default: $DIFFLO_DATA, else ~/.cache/difflo/data."""
    if os.environ.get("DIFFLO_DATA"):
        return Path(os.environ["DIFFLO_DATA"]).expanduser()
    return cache_home() / "data"


def default_root(name: str) -> Path:
    return data_home() / name


def resolve_root(name: str, root, files: str, fallbacks: tuple[Path, ...] = (), downloadable: bool = True) -> Path:
    """The directory to read ``name`` from: ``root`` if given (it must exist), else the default
    location (`difflo data download` puts files there), else the first existing fallback."""
    if root is not None and str(root) != "":
        path = Path(root).expanduser()
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            fetch = f", or fetch them with `difflo data download {name} --root DIR`" if downloadable else ""
            raise DataError(f"data root {path} {what} (data set {name}, which reads {files}); "
                            f"set data.root / --root to the directory that holds them{fetch}")
        return path
    for path in (default_root(name), *fallbacks):
        if path.is_dir():
            return path
    looked = ", ".join(str(p) for p in (default_root(name), *fallbacks))
    raise DataError(f"{name}: data.root is not set and no files were found in the default location(s) {looked}; "
                    f"run `difflo data download {name}` (or put {files} there by hand), "
                    f"or set data.root=DIR (--root DIR) to where the files are")


def first_existing(root: Path, candidates) -> Path | None:
    for c in candidates:
        p = root / c
        if p.exists():
            return p
    return None
