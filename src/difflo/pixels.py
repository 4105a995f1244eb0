"""Pixels of a decoded image file, before any tensor: bit depth to 8 bits, transparency onto a background.

Conventions (one place for the data loaders, ``difflo edit``'s image input and the web page's uploads):

- **Transparency** (RGBA, LA, PA, and palette images with a ``transparency`` entry) is composited over
  a background colour: ``out = a * rgb + (1 - a) * background``. Images keep arbitrary colours under
  their transparent pixels (Noto's emoji hide orange there, Twemoji black), so dropping alpha would
  teach a model that colour. The data's background is ``data.background`` (default white), stored
  with the model, so an edit input is composited as the training images were. Masks composite on
  black (a transparent pixel = keep).
- Palette images with per-entry transparency are converted to RGBA *before* anything else, so PIL's
  "Palette images with Transparency expressed in bytes" warning never reaches the terminal.
- **Colours** in configs and options: a name PIL knows (``white``, ``black``, ``gray``, ...), ``#rrggbb``,
  or ``r,g,b`` with 0-255 components.

Torch-free, so that ``difflo data ...`` starts fast.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageColor

from .errors import DiffloError

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def parse_colour(spec, what: str = "data.background") -> tuple[int, int, int]:
    """``spec`` (a name, ``#rrggbb``, ``r,g,b`` or a 3-sequence) as an (r, g, b) tuple of 0-255."""
    if isinstance(spec, (list, tuple)):
        parts = list(spec)
    elif isinstance(spec, str) and "," in spec:
        parts = spec.split(",")
    else:
        try:
            return ImageColor.getrgb(str(spec).strip())[:3]
        except ValueError:
            raise DiffloError(f"{what}={spec!r} is not a colour; give a name (white, black, gray), "
                              f"#rrggbb, or r,g,b with 0-255 components") from None
    try:
        rgb = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise DiffloError(f"{what}={spec!r} is not a colour; r,g,b takes three whole numbers from 0 to 255, "
                          f"e.g. 255,255,255 (or a name such as white, or #rrggbb)")
    return rgb


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def flatten_alpha(img: Image.Image, background=WHITE) -> Image.Image:
    """An image with transparency composited over ``background`` (an (r, g, b) tuple or a colour spec):
    RGB for colour sources, L for grey ones (LA); other images are returned as they are."""
    if not has_alpha(img):
        return img
    bg = background if isinstance(background, tuple) and len(background) == 3 else parse_colour(background)
    grey = img.mode in ("LA", "La")
    rgba = img.convert("RGBA")                     # P -> RGBA: no warning (P -> RGB/L would warn)
    out = Image.alpha_composite(Image.new("RGBA", rgba.size, (*bg, 255)), rgba).convert("RGB")
    return out.convert("L") if grey and bg[0] == bg[1] == bg[2] else out


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (I;16*), 32-bit integer (I) and float (F) greyscale -> 8-bit L, scaled to the range the
    values use (PIL's convert clips instead: a 16-bit mid-grey would become white); LAB -> RGB."""
    if img.mode == "LAB":                              # PIL converts LAB only through a colour profile
        from PIL import ImageCms
        lab_to_rgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                             "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_rgb)
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    a = np.asarray(img, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
        top = 1.0                                     # float images in [0, 1]
    else:
        top = 255.0 if not a.size or a.max() <= 255 else 65535.0 if a.max() <= 65535 else a.max()
    return Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), "L")


def to_mode(img: Image.Image, mode: str, background=WHITE) -> Image.Image:
    """``img`` as 8-bit ``mode`` ("L" or "RGB"): bit depth first, then transparency over ``background``."""
    img = flatten_alpha(to_8bit(img), background)
    return img if img.mode == mode else img.convert(mode)
