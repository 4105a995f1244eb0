"""Emoji: 64x64 colour images of 98 emoji subcategories (or 9 categories), in two drawing styles.

Source: the npm packages ``emoji-datasource-google@16.0.0`` (Google's Noto Emoji images) and
``emoji-datasource-twitter@16.0.0`` (Twemoji graphics), both from iamcal's emoji-data. Each tarball
holds ``package/emoji.json`` (per emoji: ``image``, ``category``, ``subcategory``, ``has_img_<style>``
and ``skin_variations``, each with its own ``image``) and ``package/img/<style>/64/<image>.png``
(64x64 PNGs with transparency: RGBA, LA or palette). ``difflo data download emoji`` fetches both
with ``npm pack`` and checks their published sha512 integrity; the loader reads straight from the
two ``.tgz`` files in ``data.root`` (nothing is unpacked to disk), decodes once and caches
(``cache.py``).

Which images: every emoji and every skin-tone variation (its own image, with its parent's category
and subcategory) whose ``has_img_<style>`` flag is true and whose file is in the tarball, except
category ``Component`` (the 5 bare skin-tone swatches). In 16.0.0 every flag is true and every
file present; the check keeps another vendor's fallback drawing out should a later version have
one. Both styles: 7,562 images (3,781 per style).

Labels (``data.label``): ``subcategory`` (default; 98 classes of 2 (``animal-amphibian``, the frog)
to 984 (``person-role``, skin tones included) images) or ``category`` (9 classes, 170 ``Activities``
to 4,522 ``People & Body``). Class names are the sorted unique names. ``data.styles``: ``google``,
``twitter`` or both (default; a list, a tuple or a comma-separated string).

Pixels: transparency is composited over ``data.background`` (default white; :mod:`difflo.images`;
Noto hides orange under its transparent pixels, Twemoji black) to RGB uint8 64x64. A smaller
``data.image_size`` (at most 64; 32 is the usual one) averages areas: a size dividing 64 takes
the mean of each block (at 32, of each 2x2 block, rounded; PIL's ``reduce``), any other size
PIL's box filter.

Split (deterministic; the packages have none): within each class, the images are sorted by
(style, image file name) and permuted by ``numpy.random.default_rng([SPLIT_SEED, crc32(class
name)])``; the first ``max(1, round(n / 10))`` of the permutation (halves rounded up) are
``test``, the rest ``train``; ``all`` is both. A class with a single image (``animal-amphibian``
with one style) is in ``train`` only. The split depends on ``data.label`` and ``data.styles``
(they decide the classes and their members); the two drawings of one emoji may fall in different
splits. Counts (train / test): both styles, subcategory 6,807 / 755, category 6,805 / 757; one
style, subcategory 3,390 / 391, category 3,403 / 378.

Licences (``LICENCE``, printed by ``difflo data info emoji``): Noto Emoji images, Copyright Google
Inc., Apache License 2.0; Twemoji graphics, Copyright Twitter, Inc (X) and other contributors,
CC-BY 4.0, which asks for attribution wherever the images (or samples of a model trained on them)
are shown: "Twemoji by Twitter, Inc and other contributors, CC-BY 4.0"; emoji-datasource
(emoji.json and the packaging), Copyright (c) 2013 Cal Henderson, MIT licence.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..errors import DataError
from ..images import WHITE, parse_colour, to_mode
from . import cache
from .base import ArrayDataset, check_split, resolve_root

VERSION = "16.0.0"
STYLES = ("google", "twitter")
LABELS = ("subcategory", "category")
PACKAGES = {s: f"emoji-datasource-{s}@{VERSION}" for s in STYLES}           # what `npm pack` is given
TARBALLS = {s: f"emoji-datasource-{s}-{VERSION}.tgz" for s in STYLES}       # what it writes
FILE_LIST = f"{TARBALLS['google']} and {TARBALLS['twitter']} (the npm packages, as downloaded)"
LEFT_OUT = ("Component",)          # the bare skin-tone swatches, not pictures
NATIVE_SIZE = 64
SPLIT_SEED = 2024
# One subcategory per group the README's emoji grids show, one named row each (benchmarks/emoji_quality.sh,
# benchmarks/gpu_emoji64.py): faces, animals, plants, food, symbols, flags, objects, travel.
SHOWN_SUBCATEGORIES = ("face-smiling", "face-affection", "cat-face", "animal-mammal", "animal-marine", "plant-flower",
                       "food-fruit", "heart", "country-flag", "keycap", "transport-ground", "sky & weather")
SPLITS = ("train", "test")

LICENCE = """\
Licences and attribution (emoji data set):
  Noto Emoji images: Copyright Google Inc., Apache License 2.0 (github.com/googlefonts/noto-emoji).
  Twemoji graphics: Copyright Twitter, Inc (X) and other contributors, licensed under CC-BY 4.0
    (creativecommons.org/licenses/by/4.0/; github.com/jdecked/twemoji). Attribution: "Twemoji by
    Twitter, Inc and other contributors, CC-BY 4.0"; say so wherever images or samples trained on
    them are shown.
  emoji-datasource (emoji.json, the packaging): Copyright (c) 2013 Cal Henderson, MIT licence
    (github.com/iamcal/emoji-data)."""


def check_options(label, styles) -> tuple[str, tuple[str, ...]]:
    """(label, styles) with their defaults filled in, or DataError naming the valid values."""
    label = "subcategory" if label is None else label
    if label not in LABELS:
        raise DataError(f"data.label={label!r} is not an emoji label; choose one of {', '.join(LABELS)}")
    if styles is None:
        return label, STYLES
    chosen = [s.strip() for s in styles.split(",")] if isinstance(styles, str) else styles
    if not isinstance(chosen, (list, tuple)) or not chosen or any(s not in STYLES for s in chosen):
        raise DataError(f"data.styles={styles!r} is not a set of emoji styles; give one or both of "
                        f"{', '.join(STYLES)} (e.g. [google] or google,twitter)")
    return label, tuple(s for s in STYLES if s in chosen)


def check_size(image_size) -> int:
    if image_size is None:
        return NATIVE_SIZE
    if not isinstance(image_size, int) or not 1 <= image_size <= NATIVE_SIZE:
        raise DataError(f"data.image_size={image_size!r}: emoji images are {NATIVE_SIZE}x{NATIVE_SIZE} and are only "
                        f"shrunk (area averaging); choose a size from 1 to {NATIVE_SIZE}, e.g. 32")
    return image_size


def _unreadable(path: Path, why: str) -> DataError:
    return DataError(f"{path}: {why}; delete it and run `difflo data download emoji` again")


@lru_cache(maxsize=8)
def _read_index(path: str, size: int, mtime_ns: int) -> tuple[list, frozenset]:
    """(emoji.json, member names) of one tarball; cached per file version (one pass over the archive)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = frozenset(tar.getnames())
            member = tar.extractfile("package/emoji.json") if "package/emoji.json" in names else None
            if member is None:
                raise _unreadable(Path(path), "has no package/emoji.json (not an emoji-datasource package?)")
            entries = json.loads(member.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _unreadable(Path(path), f"not a readable .tgz ({type(e).__name__}: {e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _unreadable(Path(path), f"package/emoji.json is not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise _unreadable(Path(path), "package/emoji.json is not a list of emoji")
    return entries, names


def tarball(root: Path, style: str) -> Path:
    path = root / TARBALLS[style]
    if not path.is_file():
        raise DataError(f"{path} is missing (emoji style {style!r}); run `difflo data download emoji` (with --root "
                        f"{root} if that is not the default) or put the file in {root}")
    return path


def entries_of(root: Path, style: str) -> list[tuple[str, str, str, str]]:
    """(style, image file name, category, subcategory) of every usable image of one style, sorted."""
    path = tarball(root, style)
    st = path.stat()
    entries, names = _read_index(str(path), st.st_size, st.st_mtime_ns)
    flag, out = f"has_img_{style}", {}
    try:
        for e in entries:
            if e["category"] in LEFT_OUT:
                continue
            for item in [e, *(e.get("skin_variations") or {}).values()]:
                if item.get(flag) and f"package/img/{style}/64/{item['image']}" in names:
                    out.setdefault(item["image"], (style, item["image"], e["category"], e["subcategory"]))
    except (KeyError, TypeError, AttributeError) as e:
        raise _unreadable(path, f"package/emoji.json lacks the expected fields ({type(e).__name__}: {e})") from None
    return [out[k] for k in sorted(out)]


def category_of(root=None, styles=None) -> dict[str, str]:
    """``{subcategory: category}`` of every usable image of the chosen styles (default both), from the
    tarballs' ``emoji.json`` (no image decoding); each subcategory lies in one category."""
    _, styles = check_options(None, styles)
    root = resolve_root("emoji", root, FILE_LIST)
    out: dict[str, str] = {}
    for style in styles:
        for _, _, category, subcategory in entries_of(root, style):
            if out.setdefault(subcategory, category) != category:
                raise _unreadable(tarball(root, style), f"subcategory {subcategory!r} is in two categories "
                                                        f"({out[subcategory]!r} and {category!r})")
    return out


def split_of(items: list[tuple], keys: list[str], classes: tuple[str, ...]) -> np.ndarray:
    """A bool mask of the ``test`` items (see the module docstring)."""
    test = np.zeros(len(items), dtype=bool)
    for c in classes:
        members = sorted((i for i, k in enumerate(keys) if k == c), key=lambda i: items[i][:2])
        if len(members) < 2:
            continue
        n_test = max(1, (len(members) + 5) // 10)                    # round(n / 10), halves up
        perm = np.random.default_rng([SPLIT_SEED, zlib.crc32(c.encode())]).permutation(len(members))
        test[[members[j] for j in perm[:n_test]]] = True
    return test


class Index(NamedTuple):
    """What :func:`index` finds for a split, without decoding an image."""
    items: list[tuple[str, str, str, str]]   # (style, image file, category, subcategory), in cache order
    labels: np.ndarray                       # int64, one per item
    classes: tuple[str, ...]                 # the class names (subcategories or categories), sorted
    root: Path                               # where the tarballs are
    split: str                               # the canonical split name
    styles: tuple[str, ...]                  # the image sets read


def index(split: str = "train", root=None, label=None, styles=None) -> Index:
    """The items of ``split``, their labels and class names, from the tarballs' ``emoji.json`` and
    member lists only (no image decoding)."""
    split = check_split("emoji", split, SPLITS)
    label, styles = check_options(label, styles)
    root = resolve_root("emoji", root, FILE_LIST)
    items = [it for s in styles for it in entries_of(root, s)]
    if not items:
        raise DataError(f"the emoji tarballs in {root} list no images; delete them and run "
                        f"`difflo data download emoji` again")
    keys = [it[3] if label == "subcategory" else it[2] for it in items]
    classes = tuple(sorted(set(keys)))
    test = split_of(items, keys, classes)
    keep = np.ones(len(items), bool) if split == "all" else test if split == "test" else ~test
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([lookup[k] for k, m in zip(keys, keep) if m], dtype=np.int64)
    return Index([it for it, m in zip(items, keep) if m], labels, classes, root, split, styles)


def _decode(data: bytes, where: str, size: int, background) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (NATIVE_SIZE, NATIVE_SIZE):
                raise DataError(f"{where} is {im.size[0]}x{im.size[1]}, not {NATIVE_SIZE}x{NATIVE_SIZE}; is it the "
                                f"right package? Delete it and run `difflo data download emoji` again")
            im = to_mode(im, "RGB", background)                     # alpha over the background, no warning
            if NATIVE_SIZE % size == 0:
                im = im.reduce(NATIVE_SIZE // size)                    # the exact mean of each block (rounded)
            else:
                im = im.resize((size, size), resample=Image.Resampling.BOX)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e}); delete the tarball and run "
                        f"`difflo data download emoji` again") from None


def decode_items(root: Path, items: list[tuple], size: int, background, out=None):
    """uint8 (N, size, size, 3) for the items, read in one pass over each tarball (stopping once all
    are found) while threads decode (PIL releases the GIL); into ``out`` (a ``cache.Rows`` streams each
    image to the cache file as it is decoded) or a new array; returns it."""
    from tqdm import tqdm

    out = np.empty((len(items), size, size, 3), dtype=np.uint8) if out is None else out
    wanted: dict[str, dict[str, int]] = {}
    for i, (style, image, *_) in enumerate(items):
        wanted.setdefault(style, {})[f"package/img/{style}/64/{image}"] = i
    workers = max(1, min(8, os.cpu_count() or 1))

    def work(i: int, data: bytes, where: str) -> None:
        out[i:i + 1] = _decode(data, where, size, background)[None]

    with tqdm(total=len(items), desc="emoji", unit="img", disable=None, leave=False) as bar, \
            ThreadPoolExecutor(workers) as pool:
        futures = []
        for style, members in wanted.items():
            path, left = tarball(root, style), dict(members)
            try:
                with tarfile.open(path, "r|gz") as tar:                 # streaming: no seeks, one pass
                    for m in tar:
                        i = left.pop(m.name, None)
                        if i is None:
                            continue
                        f = tar.extractfile(m)
                        data = f.read() if f is not None else b""
                        futures.append(pool.submit(work, i, data, f"{path}:{m.name}"))
                        if not left:
                            break
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise _unreadable(path, f"not a readable .tgz ({type(e).__name__}: {e})") from None
            if left:
                raise _unreadable(path, f"{len(left)} images listed earlier are missing (e.g. {next(iter(left))}); "
                                        f"was the file replaced while reading?")
        for fut in futures:
            fut.result()                                               # re-raises a decoding error
            bar.update(1)
    return out


def load_emoji(split="train", root=None, image_size=None, cache_dir=None, background=WHITE, label=None,
               styles=None, **_) -> ArrayDataset:
    """The emoji images of ``split`` (train, test, all); see the module docstring."""
    size = check_size(image_size)
    bg = parse_colour(background)
    found = index(split, root, label, styles)
    items, classes, root, split, styles = found.items, found.classes, found.root, found.split, found.styles
    every = [it for s in styles for it in entries_of(root, s)]        # decoded and cached once for all splits
    position = {it[:2]: i for i, it in enumerate(every)}

    def build() -> cache.Plan:
        return cache.Plan((len(every), size, size, 3), lambda out: decode_items(root, every, size, bg, out))

    # The cache holds every image of the chosen styles (labels and splits only pick rows), so the key is the
    # styles, the background and the size; the tarballs' size and mtime are hashed, and `count` says how many
    # images a complete entry holds.
    recipe = (f"emoji {VERSION} {root.resolve()} styles {','.join(styles)} left-out {','.join(LEFT_OUT)} "
              f"composite-over {bg} box-resize {size} order (style, image)")
    files = [root / TARBALLS[s] for s in styles]
    images, _ = cache.cached(f"emoji-{'-'.join(styles)}", "all", size, files, recipe, cache_dir, build,
                             count=len(every))
    rows = np.fromiter((position[it[:2]] for it in items), dtype=np.int64, count=len(items))
    if not np.array_equal(rows, np.arange(len(every))):
        images = cache.take_rows(images, rows)       # train/test: their rows, copied (at most 7,562, 93 MB)
    return ArrayDataset(images, found.labels, len(classes), "emoji", classes=classes, split=split,
                        source=str(root))
