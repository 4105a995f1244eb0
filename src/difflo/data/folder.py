"""Any folder of images (as torchvision's ``ImageFolder``, plus flat folders).

- ``root/<class>/.../*.png`` (two or more class subfolders): labelled, classes are the sorted
  subfolder names, images found recursively inside each.
- ``root/*.jpg`` (flat, or one single subfolder): unconditional (``num_classes`` 0, labels 0).
- Splits: if ``root`` has subfolders named ``train``, ``val``/``valid`` or ``test``, each is a
  split laid out as above (class names are the union over splits, so labels agree); ``all`` is
  their union. Otherwise the whole folder is the split ``train`` (``all`` is the same).

Images are resized (shorter side) and center-cropped to ``image_size``; with no image_size all
images must already share one size (cropped to a centred square). They are kept as 1 channel only
if every image is grayscale, else converted to RGB (EXIF orientation applied). Transparency (RGBA,
LA, palette) is composited over ``data.background`` (default white; :mod:`difflo.images`).
Decoded once, streaming, into the cache (``cache.py``), which training reads memory-mapped:
a folder of any size trains in bounded memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ..images import WHITE
from . import cache
from .base import ArrayDataset, check_split, resolve_root
from .decode import GRAY_MODES, IMAGE_EXTENSIONS, decode_all, is_image_file, probe

SPLIT_DIRS = ("train", "val", "valid", "test")
FILE_LIST = f"image files ({', '.join(IMAGE_EXTENSIONS)}), flat or in one subfolder per class"


def _images_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(d).parts))


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(d: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """({class: files} for subfolders holding images, top-level files)."""
    top = sorted(p for p in d.iterdir() if p.is_file() and is_image_file(p))
    per_class = {s.name: imgs for s in _subdirs(d) if (imgs := _images_under(s))}
    return per_class, top


def index(split: str, root) -> tuple[list[Path], np.ndarray, tuple[str, ...], Path, str]:
    """Image files, labels, class names, the folder and the canonical split (no decoding)."""
    if root is None or str(root) == "":
        raise DataError("the folder data set needs data.root=DIR (--root DIR): point it at the folder of your images "
                        "(one subfolder per class, or a flat folder)")
    root = resolve_root("folder", root, FILE_LIST, downloadable=False)
    splits = [s for s in SPLIT_DIRS if (root / s).is_dir()]
    if splits:
        split = check_split(f"folder {root}", split, splits)
        dirs = splits if split == "all" else [split]
    else:
        split = check_split(f"folder {root} (no train/, val/ or test/ subfolders, so the whole folder is "
                            f"split train)", split, ("train",))
        dirs = [None]
    scans = {s: _scan(root / s if s else root) for s in (splits or [None])}
    class_names = sorted(set().union(*(set(pc) for pc, _ in scans.values())))
    labelled = len(class_names) >= 2
    files, labels = [], []
    for s in dirs:
        per_class, top = scans[s]
        where = root / s if s else root
        if labelled and top:
            raise DataError(f"{where} mixes images at its top level (e.g. {top[0].name}) with class subfolders "
                            f"({', '.join(per_class)}); move the loose images into a class folder, or use a flat "
                            f"folder")
        if labelled:
            for c, imgs in per_class.items():
                files += imgs
                labels += [class_names.index(c)] * len(imgs)
        else:
            imgs = top + [p for ps in per_class.values() for p in ps]
            files += imgs
            labels += [0] * len(imgs)
    if not files:
        where = ", ".join(str(root / s) if s else str(root) for s in dirs)
        raise DataError(f"no images found in {where}; the folder data set reads {FILE_LIST}; set data.root to "
                        f"the folder that holds them")
    return files, np.asarray(labels, np.int64), tuple(class_names) if labelled else (), root, split


def load_folder(split="train", root=None, image_size=None, cache_dir=None, background=WHITE, **_) -> ArrayDataset:
    files, labels, classes, root, split = index(split, root)
    fix = "replace or delete it"

    def build() -> cache.Plan:
        channels, first = 1, None                  # headers only, one file at a time (no list of N sizes)
        for f in files:
            mode, wh = probe(f, fix)
            channels = channels if mode in GRAY_MODES else 3
            if image_size is None and first is None:
                first = (f, wh)
            elif image_size is None and wh != first[1]:
                (w0, h0), (w1, h1) = first[1], wh
                raise DataError(f"the images in {root} have different sizes ({first[0].name} is {w0}x{h0}, "
                                f"{f.name} is {w1}x{h1}); set data.image_size (e.g. 64) to resize and "
                                f"center-crop them all")
        size = image_size if image_size is not None else min(first[1])
        return cache.Plan((len(files), size, size, channels),
                          lambda out: decode_all(files, size, channels, desc=f"folder {root.name}", fix=fix,
                                                 background=background, out=out))

    recipe = f"folder {root.resolve()} gray-if-all resize-shorter+center-crop {image_size} background {background}"
    images, _ = cache.cached(f"folder-{root.name}", split, image_size, files, recipe, cache_dir, build,
                             source=root)
    return ArrayDataset(images, labels, len(classes), "folder", classes=classes, split=split,
                        source=str(root))
