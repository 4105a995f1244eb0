"""Turning tensors into files: uint8 arrays, labelled PNG grids, GIFs, the loss curve."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    os.replace(tmp, path)


def save_gif(frames: list[Image.Image], path: str | Path, ms_per_frame: int = 80, hold_last: int = 15) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    frames = frames + [frames[-1]] * hold_last
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    os.replace(tmp, path)


def plot_loss(metrics_csv: str | Path, out_png: str | Path) -> None:
    """Loss (raw and smoothed) against step from metrics.csv."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    tmp = Path(out_png).with_name(f".{Path(out_png).name}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out_png)
    except BaseException:                  # e.g. the disk is full: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
