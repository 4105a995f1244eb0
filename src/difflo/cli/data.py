"""``difflo data download NAME``, ``difflo data info NAME`` and ``difflo data clean``.

``add_parser(sub)`` adds the ``data`` command to the subparsers of the ``difflo`` parser;
``run(args)`` executes it and returns the exit code. User errors raise ``DataError`` (the
``difflo`` entry point prints them as ``difflo: error: ...`` with exit code 2).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from ..data import DATASETS, celeba, data_home, emoji, flowers, folder, load
from ..data.base import check_split, resolve_root
from ..data.cache import cache_dir_of, human, stale
from ..data.download import download
from ..data.decode import GRAY_MODES, probe
from ..errors import DataError
from .argtypes import positive_float, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``data`` (with ``download``, ``info`` and ``clean``) to an argparse subparsers object."""

    names = ", ".join(DATASETS)
    p = sub.add_parser("data", help="download data sets and show what a data set holds",
                       description=f"Data sets: {names} (see docs/data.md).")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{download,info,clean}")
    d = dsub.add_parser("download", help="fetch a data set from its official source and verify its checksums",
                        description="Download a data set's files from their official source and verify the published "
                                    "MD5 checksums (files already present are verified, not fetched again). CelebA "
                                    "is on Google Drive only: the command prints how to fetch it by hand. emoji is "
                                    "two npm packages: fetched with `npm pack` (needs Node.js/npm; $DIFFLO_NPM names "
                                    "another npm) and checked against their published sha512 integrity.")
    d.add_argument("name", metavar="NAME", help=names)
    d.add_argument("--root", help=f"where to put the files (default {data_home()}/NAME, where the loaders look "
                                  f"when data.root is not set)")
    d.add_argument("--timeout", type=positive_float, default=10.0, help="network timeout in seconds (default 10)")
    i = dsub.add_parser("info", help="images per split and per class, resolution, channels, source",
                        description="Show a data set's images per split and per class, the resolution and channels "
                                    "training would see, and where its files were read from.")
    i.add_argument("name", metavar="NAME", help=names)
    i.add_argument("--root", help="the data set's directory (default: where `difflo data download` puts it)")
    i.add_argument("--split", help="only this split (default: every split)")
    i.add_argument("--image-size", type=positive_int, help="as data.image_size (default: the data set's own, 64 for "
                                                     "flowers102, celeba and emoji)")
    i.add_argument("--attribute", help="celeba: count the classes of this attribute (as data.attribute)")
    i.add_argument("--label", help="emoji: subcategory (default) or category (as data.label)")
    i.add_argument("--styles", help="emoji: google, twitter or google,twitter (default; as data.styles)")
    i.add_argument("--cache-dir", help="as data.cache_dir")
    c = dsub.add_parser("clean", help="remove decoded-image cache files that no current source would use",
                        description="Remove the decoded-image cache's entries that no current source would use: "
                                    "made by an older difflo (no record of their source), whose source directory "
                                    "is gone or whose files changed since, or replaced by a newer entry of the same "
                                    "source; and killed builds' temporary files. Prints each file and the space "
                                    "freed. Entries in use by a running job may be removed: it keeps reading them.")
    c.add_argument("--cache-dir", metavar="DIR", help=f"as data.cache_dir (default {cache_dir_of(None)})")
    c.add_argument("--all", action="store_true", help="remove every entry, current ones too (rebuilt when next used)")
    c.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.data_command == "download":
        download(args.name, args.root, timeout=args.timeout)
        return 0
    if args.data_command == "clean":
        return clean(args.cache_dir, everything=args.all, dry_run=args.dry_run)
    print(info_text(args.name, args.root, args.split, args.image_size, args.attribute, args.cache_dir,
                    label=args.label, styles=args.styles))
    return 0


def clean(cache_dir=None, everything: bool = False, dry_run: bool = False) -> int:
    """``difflo data clean``: print and remove (``dry_run``: only print) what ``cache.stale`` finds."""
    directory, files = stale(cache_dir, everything)
    if not files:
        print(f"nothing to remove in {directory}" if directory.exists() else f"nothing to remove: no {directory}")
        return 0
    freed, failed = 0, {}
    for f in files:                                         # an entry before its record: kept together
        if not dry_run:
            if f.path.with_suffix(".npy") in failed:
                continue
            try:
                f.path.unlink()
            except FileNotFoundError:
                continue                                    # removed meanwhile
            except OSError as e:
                failed[f.path] = f"{f.path} ({e.strerror or e})"
                continue
        freed += f.size
        print(f"{'would remove' if dry_run else 'removed'} {f.path} ({human(f.size)}): {f.why}")
    verb = "would free" if dry_run else "freed"
    exact = f" ({freed:,} bytes)" if freed >= 1000 else ""
    print(f"{verb} {human(freed)}{exact} in {directory}" + ("; run without --dry-run to remove them" * dry_run))
    if failed:
        first = next(iter(failed.values()))
        raise DataError(f"could not remove {len(failed)} of {len(files)} files, the first {first}; "
                        f"check the permissions of {directory}")
    return 0


@dataclass
class SplitSummary:
    split: str
    count: int
    class_counts: np.ndarray
    classes: tuple[str, ...]
    size: str                 # "28x28", or a note when the folder's sizes differ
    channels: int
    source: str


def summarize(name: str, root=None, split: str | None = None, image_size: int | None = None,
              attribute: str | None = None, cache_dir=None, label: str | None = None,
              styles: str | None = None) -> list[SplitSummary]:
    """One summary per split (every split when ``split`` is None). Flowers-102, CelebA, emoji and
    folders are counted from their label files and image headers, without decoding the images."""

    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if attribute and "attribute" not in spec.options:
        raise DataError(f"--attribute is only for celeba, not {name}")
    for flag, value in (("--label", label), ("--styles", styles)):
        if value is not None and flag[2:] not in spec.options:
            raise DataError(f"{flag} is only for emoji, not {name}")
    if name == "folder":
        if not root:
            raise DataError("the folder data set needs --root DIR: the folder of your images")
        r = resolve_root("folder", root, folder.FILE_LIST, downloadable=False)
        splits = [split] if split else [s for s in folder.SPLIT_DIRS if (r / s).is_dir()] or ["train"]
    else:
        splits = [check_split(name, split, spec.splits, spec.aliases)] if split else list(spec.splits)
    out = []
    for s in splits:
        if name == "flowers102":
            files, labels, d, s = flowers.index(s, root)
            n_cls, classes, size, ch, src = flowers.NUM_CLASSES, flowers.CLASSES, image_size or 64, 3, d
        elif name == "celeba":
            files, labels, n_cls, classes, src, s = celeba.index(s, root, attribute)
            size, ch = image_size or celeba.DEFAULT_SIZE, 3
        elif name == "emoji":
            found = emoji.index(s, root, label, styles)
            labels, classes, src, s = found.labels, found.classes, found.root, found.split
            n_cls, size, ch = len(classes), emoji.check_size(image_size), 3
        elif name == "folder":
            files, labels, classes, src, s = folder.index(s, root)
            n_cls = len(classes)
            modes, sizes = zip(*(probe(f) for f in files))
            ch = 1 if all(m in GRAY_MODES for m in modes) else 3
            size = image_size or (min(sizes[0]) if len(set(sizes)) == 1 else
                                  f"mixed ({len(set(sizes))} sizes: set data.image_size)")
        else:
            ds = load(name, s, root, image_size=image_size, cache_dir=cache_dir)
            labels, n_cls, classes, size, ch, src = ds.labels, ds.num_classes, ds.classes, ds.image_size, \
                ds.channels, ds.source
        counts = np.bincount(labels, minlength=max(n_cls, 1))
        size_text = f"{size}x{size}" if isinstance(size, int) else size
        out.append(SplitSummary(s, len(labels), counts, tuple(classes), size_text, ch, str(src)))
    return out


def info_text(name: str, root=None, split=None, image_size=None, attribute=None, cache_dir=None, label=None,
              styles=None) -> str:

    rows = summarize(name, root, split, image_size, attribute, cache_dir, label, styles)
    first = rows[0]
    n_cls = len(first.classes)
    lines = [f"{name}: {DATASETS[name].description}",
             f"read from {first.source}" + ("" if all(r.source == first.source for r in rows) else
                                            " (and " + ", ".join(sorted({r.source for r in rows[1:]})) + ")"),
             f"resolution {first.size}, {first.channels} channel{'s' if first.channels > 1 else ''} "
             f"({'grayscale' if first.channels == 1 else 'RGB'}), "
             + (f"{n_cls} classes" if n_cls else "unconditional (num_classes 0)"), ""]
    width = max(6, *(len(r.split) for r in rows))
    lines.append(f"{'split':<{width}}  {'images':>9}")
    lines += [f"{r.split:<{width}}  {r.count:>9,}" for r in rows]
    if len(rows) > 1:
        lines.append(f"{'total':<{width}}  {sum(r.count for r in rows):>9,}")
    if n_cls:
        names = [f"{c} {n}" if n != str(c) else str(c) for c, n in enumerate(first.classes)]
        cw = max(5, *(len(n) for n in names))
        lines += ["", f"{'class':<{cw}}" + "".join(f"  {r.split:>9}" for r in rows)]
        for c, label in enumerate(names):
            lines.append(f"{label:<{cw}}" + "".join(f"  {int(r.class_counts[c]) if c < len(r.class_counts) else 0:>9,}"
                                                    for r in rows))
    if DATASETS[name].licence:
        lines += ["", DATASETS[name].licence]
    return "\n".join(lines)
