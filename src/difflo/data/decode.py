"""Decoding image files into fixed-size uint8 arrays: resize the shorter side, then center-crop.

The resize follows guided-diffusion's ``center_crop_arr`` (Dhariwal & Nichol 2021,
``improved_diffusion/image_datasets.py``): halve with a box filter while the shorter side is at
least twice the target (cheap and alias-free), then one bicubic resize so the shorter side equals
the target, then a center crop. Large JPEGs are first decoded at a reduced scale with PIL's
``draft`` (DCT scaling), never below twice the target size.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError
from ..images import WHITE, to_mode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
CHUNK = 64                  # images per task of the decoding threads
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _corrupt(path: Path, e: Exception, fix: str) -> DataError:
    return DataError(f"{path}: cannot decode image ({type(e).__name__}: {e}); the file is corrupt or not an "
                     f"image: {fix}")


def probe(path: Path, fix: str = "replace or delete it") -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _corrupt(path, e, fix) from None


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side -> size (box-filter halvings, then bicubic), then the central size x size."""
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = size / min(im.size)
    new = tuple(max(size, round(x * scale)) for x in im.size)
    if new != im.size:
        im = im.resize(new, resample=Image.Resampling.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode(path: Path, size: int | None, channels: int, box: tuple[int, int, int, int] | None = None,
           fix: str = "replace or delete it", background=WHITE) -> np.ndarray:
    """One image file -> uint8 (size, size, channels). ``box`` (left, upper, right, lower) is cropped
    first (in the stored image's pixels); ``size`` None keeps the (square) size. Transparency is
    composited over ``background`` (:mod:`difflo.images`)."""
    try:
        with Image.open(path) as im:
            if box is None and size is not None and im.format == "JPEG":
                im.draft(None, (2 * size, 2 * size))       # decode at 1/2, 1/4 or 1/8 scale when large
            im = ImageOps.exif_transpose(im)
            im = to_mode(im, "L" if channels == 1 else "RGB", background)   # 8 bits; alpha over background
            if box is not None:
                im = im.crop(box)
            if size is not None:
                im = resize_center_crop(im, size)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _corrupt(path, e, fix) from None
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def decode_all(paths: list[Path], size: int | None, channels: int, box=None, desc: str = "decoding",
               fix: str = "replace or delete it", background=WHITE, out=None):
    """Decode many files in parallel threads (PIL releases the GIL while decoding and resizing) into
    ``out`` (rows 0..N-1; a ``cache.Rows`` streams them to the cache file), or into a new uint8
    (N, size, size, channels) array; returns it. Each thread decodes CHUNK images into a buffer of its
    own and stores them with one ``out[lo:hi] = buffer``, so besides ``out`` at most threads x CHUNK
    decoded images are in memory. A progress bar on a terminal."""
    from tqdm import tqdm

    if not paths:
        raise DataError("no images to decode")
    first = decode(paths[0], size, channels, box, fix, background)
    if out is None:
        out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    elif tuple(out.shape) != (len(paths), *first.shape):
        raise DataError(f"{paths[0]} decodes to {first.shape[1]}x{first.shape[0]}x{first.shape[2]}, not "
                        f"{out.shape[2]}x{out.shape[1]}x{out.shape[3]}; set data.image_size to resize them all")
    out[0:1] = first[None]

    def work(lo: int, hi: int) -> int:
        buf = np.empty((hi - lo, *first.shape), dtype=np.uint8)
        for i in range(lo, hi):
            arr = decode(paths[i], size, channels, box, fix, background)
            if arr.shape != first.shape:
                raise DataError(f"{paths[i]} decodes to {arr.shape[1]}x{arr.shape[0]}, but {paths[0]} to "
                                f"{first.shape[1]}x{first.shape[0]}; set data.image_size to resize them all")
            buf[i - lo] = arr
        out[lo:hi] = buf
        return hi - lo

    chunks = [(lo, min(lo + CHUNK, len(paths))) for lo in range(1, len(paths), CHUNK)]
    workers = max(1, min(8, os.cpu_count() or 1, len(chunks)))
    with tqdm(total=len(paths), initial=1, desc=desc, unit="img", disable=None, leave=False) as bar:
        if workers == 1:
            for lo, hi in chunks:
                bar.update(work(lo, hi))
        else:
            pool = ThreadPoolExecutor(workers)
            try:
                for n in pool.map(lambda c: work(*c), chunks):
                    bar.update(n)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)      # on an error, stop at once
    return out


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """Resize + center-crop an in-memory uint8 (N, H, W, C) set (for data.image_size on MNIST/CIFAR)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    c = images.shape[3]
    out = np.empty((len(images), size, size, c), dtype=np.uint8)
    for i, img in enumerate(images):
        im = Image.fromarray(img[:, :, 0] if c == 1 else img)
        out[i] = np.asarray(resize_center_crop(im, size)).reshape(size, size, c)
    return out
