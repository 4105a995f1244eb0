"""CelebA (Liu et al. 2015): 202,599 aligned 178x218 face photos, 64x64 after the standard crop.

Reads ``img_align_celeba/*.jpg``, ``list_eval_partition.txt`` (``000001.jpg 0``: 0 train
(162,770), 1 valid (19,867), 2 test (19,962)) and, with ``attribute`` set,
``list_attr_celeba.txt`` (line 1 the count, line 2 the 40 attribute names, then one row of
-1/+1 per image). Kaggle's ``.csv`` versions of the two lists are read too.

Crop: the 128x128 box centred at (x, y) = (89, 121), i.e. PIL box (25, 57, 153, 185), then a
resize to ``image_size`` (default 64). This is the crop of DDIM (Song et al. 2021) and NCSNv2 /
D2C (``Crop(x1=57, x2=185, y1=25, y2=153)`` on (row, column)); it keeps the face from eyebrows to
chin. Images of another size (not 178x218) are center-cropped to a square instead.

Unconditional by default (``num_classes`` 0, labels all 0). With ``attribute`` (e.g. ``Smiling``)
it has 2 classes: 0 where the attribute is -1, 1 where it is +1.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import cache
from .base import ArrayDataset, check_split, resolve_root
from .decode import decode_all, probe

SPLITS = {"train": 0, "valid": 1, "test": 2}
ALIASES = {"val": "valid"}
ALIGNED_SIZE = (178, 218)
CROP_BOX = (25, 57, 153, 185)            # (left, upper, right, lower): 128x128 centred at (89, 121)
DEFAULT_SIZE = 64
FILE_LIST = "img_align_celeba/*.jpg (from img_align_celeba.zip), list_eval_partition.txt, and " \
            "list_attr_celeba.txt (for data.attribute)"


def base_dir(root: Path) -> Path:
    for d in (root, root / "celeba"):
        if (d / "img_align_celeba").is_dir() or (d / "list_eval_partition.txt").is_file() \
                or (d / "list_eval_partition.csv").is_file():
            return d
    if (root / "img_align_celeba.zip").is_file():
        zipped = root / "img_align_celeba.zip"
        raise DataError(f"{zipped} is not extracted: run `unzip -q {zipped} -d {root}`")
    return root


def image_dir(d: Path) -> Path:
    img = d / "img_align_celeba"
    if (img / "img_align_celeba").is_dir():              # Kaggle's zip nests the folder
        img = img / "img_align_celeba"
    if not img.is_dir():
        raise DataError(f"{img} not found; CelebA reads {FILE_LIST}. Download img_align_celeba.zip (see "
                        f"`difflo data download celeba`) and unzip it into {d}")
    return img


def _list_file(d: Path, stem: str) -> Path:
    for ext in (".txt", ".csv"):
        if (d / (stem + ext)).is_file():
            return d / (stem + ext)
    raise DataError(f"{d / (stem + '.txt')} not found; CelebA reads {FILE_LIST}. Download it from the CelebA "
                    f"Google Drive (see `difflo data download celeba`) into {d}")


def _rows(path: Path) -> list[list[str]]:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; download it again") from None
    sep = "," if path.suffix == ".csv" else None
    return [line.split(sep) for line in text.splitlines() if line.strip()]


def read_partition(d: Path) -> tuple[list[str], np.ndarray, Path]:
    path = _list_file(d, "list_eval_partition")
    rows = _rows(path)
    if path.suffix == ".csv" and rows and not rows[0][-1].strip().isdigit():
        rows = rows[1:]                                   # header "image_id,partition"
    names, parts = [], []
    for i, r in enumerate(rows):
        if len(r) != 2 or r[1].strip() not in ("0", "1", "2"):
            raise DataError(f"{path}, line {i + 1}: expected '<image>.jpg <0|1|2>', got {' '.join(r)!r}")
        names.append(r[0].strip())
        parts.append(int(r[1]))
    if not names:
        raise DataError(f"{path} is empty; download it again")
    return names, np.asarray(parts), path


def read_attribute(d: Path, attribute: str, names: list[str]) -> tuple[np.ndarray, Path]:
    """0/1 labels (-1 -> 0, +1 -> 1) of ``attribute`` for the images ``names``."""
    path = _list_file(d, "list_attr_celeba")
    rows = _rows(path)
    if path.suffix == ".csv":
        header, body, count = [h.strip() for h in rows[0][1:]], rows[1:], None
    else:
        if len(rows) < 2 or len(rows[0]) != 1 or not rows[0][0].isdigit():
            raise DataError(f"{path}: expected the image count on line 1 and the attribute names on line 2")
        count, header, body = int(rows[0][0]), rows[1], rows[2:]
    if attribute not in header:
        close = difflib.get_close_matches(attribute, header, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"unknown CelebA attribute {attribute!r} (data.attribute); {hint}the attributes in {path.name} "
                        f"are: {', '.join(header)}")
    if count is not None and len(body) != count:
        raise DataError(f"{path}: line 1 says {count:,} images but it has {len(body):,} rows: the file is truncated; "
                        f"download it again")
    col = header.index(attribute) + 1
    values = {}
    for i, r in enumerate(body):
        if len(r) != len(header) + 1 or r[col].strip() not in ("1", "-1"):
            raise DataError(f"{path}, row {i + 1}: expected an image name and {len(header)} values of -1/1")
        values[r[0].strip()] = r[col].strip() == "1"
    missing = [n for n in names if n not in values]
    if missing or len(values) != len(names):
        raise DataError(f"{path} lists {len(values):,} images but list_eval_partition lists {len(names):,}"
                        f"{f' (e.g. {missing[0]} has no attributes)' if missing else ''}; the label files do not "
                        f"match: download both again")
    return np.fromiter((values[n] for n in names), dtype=np.int64, count=len(names)), path


def index(split: str, root, attribute: str | None = None):
    """(image files, labels, num_classes, class names, folder, split) of a split, without decoding."""
    split = check_split("celeba", split, tuple(SPLITS), ALIASES)
    d = base_dir(resolve_root("celeba", root, FILE_LIST))
    names, parts, part_path = read_partition(d)
    img = image_dir(d)
    keep = np.ones(len(names), bool) if split == "all" else parts == SPLITS[split]
    files = [img / n for n, k in zip(names, keep) if k]
    if not files:
        raise DataError(f"{part_path} assigns no image to split {split}")
    if attribute:
        labels, n_cls, classes = read_attribute(d, attribute, names)[0][keep], 2, (f"not {attribute}", attribute)
    else:
        labels, n_cls, classes = np.zeros(len(files), np.int64), 0, ()
    return files, labels, n_cls, classes, d, split


def load_celeba(split="train", root=None, image_size=None, attribute=None, cache_dir=None, **_) -> ArrayDataset:
    files, labels, n_cls, classes, d, split = index(split, root, attribute)
    size = image_size or DEFAULT_SIZE
    fix = "extract img_align_celeba.zip again"
    if not files[0].is_file():
        raise DataError(f"{files[0]} not found (listed in list_eval_partition); extract img_align_celeba.zip into {d}")
    _, first_size = probe(files[0], fix)
    box = CROP_BOX if first_size == ALIGNED_SIZE else None
    recipe = f"celeba rgb box={box} resize-shorter+center-crop {size}"
    plan = cache.Plan((len(files), size, size, 3),
                      lambda out: decode_all(files, size, 3, box, desc=f"celeba {split}", fix=fix, out=out))
    images, _ = cache.cached("celeba", split, size, files, recipe, cache_dir, lambda: plan)
    return ArrayDataset(images, labels, n_cls, "celeba", classes=classes, split=split, source=str(d))
