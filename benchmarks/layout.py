#!/usr/bin/env python
"""channels_last vs the default (NCHW) layout, op by op and for the whole UNet, in one run.

    python benchmarks/layout.py              # fp32; add --bf16 for bf16 autocast too

For the ops of difflo's UNet at the shapes of the benchmark model (32x32x3, widths 32/64/128, batch 64)
and the whole UNet (training step and inference), the median time in each layout and their ratio
(> 1: channels_last is faster). The UNet keeps a layout only where this table says it pays.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from difflo import allocator, precision  # noqa: E402
from difflo.nn import UNet, UNetConfig  # noqa: E402
from difflo.nn.unet import Attention  # noqa: E402
from timing import median_time as timed  # noqa: E402  (benchmarks/timing.py)

CL = torch.channels_last


def ops(B: int, C: int, H: int):
    """(name, make(layout) -> a no-argument function) for the UNet's ops at one shape."""
    def x_(layout, c=C, h=H):
        x = torch.randn(B, c, h, h)
        return x.contiguous(memory_format=CL) if layout == "cl" else x

    def conv(layout):
        x, w = x_(layout), torch.randn(C, C, 3, 3)
        w = w.contiguous(memory_format=CL) if layout == "cl" else w
        return lambda: F.conv2d(x, w, padding=1)

    def gn(layout):
        x, m = x_(layout), torch.nn.GroupNorm(32 if C % 32 == 0 else 8, C)
        return lambda: m(x)

    def silu(layout):
        x = x_(layout)
        return lambda: F.silu(x)

    def cat(layout):
        a, b = x_(layout), x_(layout)
        return lambda: torch.cat([a, b], 1)

    def up(layout):
        x = x_(layout, h=H // 2)
        return lambda: F.interpolate(x, scale_factor=2, mode="nearest")

    def attn(layout):
        m = Attention(C, 4)
        m = m.to(memory_format=CL) if layout == "cl" else m
        x = x_(layout)
        return lambda: m(x)

    return [("conv 3x3", conv), ("GroupNorm", gn), ("SiLU", silu), ("concat", cat), ("upsample x2", up),
            ("attention block", attn)]


def unet(kind: str, B: int):
    cfg = UNetConfig(in_channels=3, image_size=32, num_classes=10, channels=32, channel_mult=(1, 2, 4),
                     num_res_blocks=2, attn_resolutions=(8,), attn_heads=4)

    def make(layout):
        torch.manual_seed(0)
        net, x = UNet(cfg), torch.randn(B, 3, 32, 32)
        if layout == "cl":
            net, x = net.to(memory_format=CL), x.contiguous(memory_format=CL)
        t, y = torch.rand(B) * 999, torch.randint(0, 10, (B,))
        opt = torch.optim.AdamW(net.parameters(), foreach=True)
        if kind == "infer":
            return lambda: net(x, t, y)

        def step():
            loss = net(x, t, y).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step
    return make


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", action="store_true", help="also under bf16 autocast")
    a = ap.parse_args()
    allocator.tune_malloc()
    print(f"# channels_last / default, {time.strftime('%Y-%m-%d')}, {precision.cpu_model()} "
          f"({' '.join(precision.speed_flags())}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    dtypes = ["fp32", "bf16"] if a.bf16 else ["fp32"]
    print("| op | shape | " + " | ".join(f"{d} default ms | {d} channels_last ms | {d} speed-up" for d in dtypes)
          + " |")
    print("|---|---|" + "---|---|---|" * len(dtypes))
    rows = [(name, f"{B}x{C}x{H}x{H}", make) for B, C, H in ((64, 32, 32), (64, 128, 8)) for name, make in
            ops(B, C, H)]
    rows += [("UNet inference", "64x3x32x32", unet("infer", 64)), ("UNet training step", "64x3x32x32",
                                                                       unet("train", 64))]
    for name, shape, make in rows:
        cells = []
        for d in dtypes:
            with torch.no_grad() if "training" not in name else torch.enable_grad(), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=d == "bf16"):
                t_def, t_cl = timed(make("default")), timed(make("cl"))
            cells.append(f"{1e3 * t_def:.2f} | {1e3 * t_cl:.2f} | {t_def / t_cl:.2f}x")
        print(f"| {name} | {shape} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
