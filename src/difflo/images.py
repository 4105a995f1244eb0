"""Image files, the one module for them: pixels of a decoded file (bit depth to 8 bits, transparency
onto a background, colours), tensors to uint8 arrays, labelled PNG grids, GIFs and the loss curve;
image files and uploads to model inputs (the one decoder for ``difflo edit`` and the web page).

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
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont

from .errors import DiffloError
from .io import atomic_path, pyplot

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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_image(images: np.ndarray, ncol: int, row_labels: list[str] | None = None, scale: int | None = None,
               pad: int = 2) -> Image.Image:
    """Tile (N, H, W, C) uint8 images, ``ncol`` per row; optional text label at the left of each row.
    Small images are enlarged (nearest) so that a cell is at least 56 pixels."""
    n, h, w, c = images.shape
    scale = scale or max(1, -(-56 // h))
    h, w = h * scale, w * scale
    nrow = -(-n // ncol)
    label_w = 0
    font = ImageFont.load_default()
    if row_labels:
        label_w = max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(s, font=font)) for s in row_labels) + 8
    canvas = Image.new("RGB", (label_w + ncol * (w + pad) + pad, nrow * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        tile = Image.fromarray(img[:, :, 0] if c == 1 else img).convert("RGB").resize((w, h), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + col * (w + pad), pad + r * (h + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text((4, pad + r * (h + pad) + h // 2 - 6), text, fill="black", font=font)
    return canvas


def save_image(img: Image.Image, path: str | Path) -> None:
    """Save atomically (temp file + rename), format from the suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def save_gif(frames: list[Image.Image], path: str | Path, ms_per_frame: int = 80, hold_last: int = 15) -> None:
    frames = frames + [frames[-1]] * hold_last
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)


def plot_loss(metrics_csv: str | Path, out_png: str | Path) -> None:
    """Loss (raw and smoothed) against step from metrics.csv."""
    plt = pyplot()
    import matplotlib.ticker

    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]     # evaluation rows have no loss
    if not rows:
        return
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss (logged mean)")
    if len(loss) >= 5:
        k = max(2, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.6, label=f"moving average ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FormatStrFormatter("%g")      # 0.9, not mathtext 9x10^-1 (slow to render)
    ok = loss[np.isfinite(loss) & (loss > 0)]
    ax.yaxis.set_major_formatter(plain)                      # minor ticks labelled within one decade only
    ax.yaxis.set_minor_formatter(plain if ok.size and ok.max() < 10 * ok.min() else matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.96)   # not tight_layout: drawn at every checkpoint
    try:
        with atomic_path(out_png) as tmp:  # e.g. the disk is full: leave no partial file behind
            fig.savefig(tmp)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- reading image files
# The one decoder of ``difflo edit``'s files and the web page's uploads: open (PIL errors become one
# line), bring any mode to 8-bit L or RGB (16-bit/32-bit/float greyscale scaled, not clipped; LAB
# through a colour profile; transparency over the model's data.background, pixels.py), resize to the model's size.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_image(source, what: str = "image") -> Image.Image:
    """A loaded PIL image from a path or bytes; a missing or unreadable file is one DiffloError."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        img.load()
        return img
    except FileNotFoundError:
        raise DiffloError(f"{what} {source} not found") from None
    except READ_ERRORS as e:
        where = "" if isinstance(source, (bytes, bytearray)) else f" {source}"
        raise DiffloError(f"cannot read {what}{where}: {e} (give a PNG or JPG)") from None


def model_image(img: Image.Image, channels: int, size: int, notes: list, what: str = "image",
                note_mode: bool = True, background=WHITE) -> Image.Image:
    """``img`` in the model's mode (L for 1 channel, RGB for 3) and size (LANCZOS), noting the resize
    (and the mode conversion with ``note_mode``); transparency is composited over ``background``
    (the model's ``data.background``, :mod:`difflo.images`)."""
    if channels not in (1, 3):
        raise DiffloError(f"this model has {channels} channels; image files can be loaded for 1 (L) or 3 (RGB)")
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        if note_mode:
            notes.append(f"{what}: converted {img.mode} to {mode} for a {channels}-channel model"
                         + (f" (transparency composited on {background})" if "A" in img.mode else ""))
        try:
            img = to_mode(img, mode, background)
        except (ValueError, OSError) as e:
            raise DiffloError(f"cannot convert {what} from mode {img.mode} to {mode} ({e}); "
                              f"save it as an 8-bit RGB or greyscale PNG") from None
    if img.size != (size, size):
        notes.append(f"{what}: resized {img.size[0]}x{img.size[1]} to the model's {size}x{size}")
        img = img.resize((size, size), Image.LANCZOS)
    return img


def image_tensor(img: Image.Image) -> torch.Tensor:
    """An 8-bit L or RGB image as (1, C, H, W) in [-1, 1]."""
    a = np.asarray(img, dtype=np.float32)
    a = a.reshape(*a.shape[:2], -1) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).contiguous()


def load_image(path, channels: int, size: int, notes: list | None = None, background=WHITE) -> torch.Tensor:
    """(1, C, size, size) in [-1, 1] from an image file; converts channels (transparency over
    ``background``) and resizes, noting both."""
    notes = notes if notes is not None else []
    return image_tensor(model_image(open_image(path), channels, size, notes, str(path), background=background))


def mask_image(img: Image.Image, size: int, what: str = "mask") -> Image.Image:
    """An L image of 0/255: white (>= 128 after compositing alpha on black) = regenerate; NEAREST-resized."""
    try:
        m = to_mode(img, "L", BLACK)            # transparent = black = keep
    except (ValueError, OSError) as e:
        raise DiffloError(f"cannot read {what} (mode {img.mode}) as greyscale ({e}); save it as an 8-bit "
                          f"PNG") from None
    if m.size != (size, size):
        m = m.resize((size, size), Image.NEAREST)
    return Image.fromarray(np.where(np.asarray(m) >= 128, 255, 0).astype(np.uint8), "L")


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A 0/255 mask image (:func:`mask_image`) as (1, 1, H, W) floats: 1 = regenerate."""
    return torch.from_numpy((np.asarray(mask) >= 128).astype(np.float32))[None, None]


def load_mask(path, image_path, size: int) -> torch.Tensor:
    """(1, 1, size, size) of 0/1: 1 (white, >= 128) = regenerate. Must be as large as the image."""
    m, im = open_image(path), open_image(image_path)
    if m.size != im.size:
        raise DiffloError(f"mask {path} is {m.size[0]}x{m.size[1]} but image {image_path} is "
                          f"{im.size[0]}x{im.size[1]}; give a mask of the image's size")
    return mask_tensor(mask_image(m, size, f"mask {path}"))
