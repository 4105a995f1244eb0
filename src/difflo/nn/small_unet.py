"""A small unconditional UNet for 28x28 images (Ronneberger, Fischer & Brox 2015, "U-Net").

``SmallUNet(hidden, channels)(x) -> out`` with x, out: (B, channels, 28, 28). No time or class
input: it maps an image to an image of the same shape (the classic single-step denoiser of Berkeley
CS180/280A Project 5B, Part 1, which ``difflo study denoiser`` trains).

Blocks (D = ``hidden``, the width):

* Conv = Conv3x3 -> BatchNorm -> GELU; ConvBlock = Conv, Conv (the size is kept);
* DownBlock = stride-2 Conv3x3 -> BatchNorm -> GELU, ConvBlock (halves the size);
* UpBlock = stride-2 ConvTranspose4x4 -> BatchNorm -> GELU, ConvBlock (doubles the size);
* Flatten = AvgPool(7) -> GELU (7x7 -> 1x1); Unflatten = ConvTranspose(7, stride 7) -> BatchNorm
  -> GELU (1x1 -> 7x7).

Layout, with the skip connections concatenating channels::

    x (B, C, 28, 28) -> ConvBlock  -> h0 (B, D, 28, 28)
    h0 -> DownBlock                -> h1 (B, D, 14, 14)
    h1 -> DownBlock                -> h2 (B, 2D, 7, 7)
    h2 -> Flatten, Unflatten       -> h  (B, 2D, 7, 7)
    [h, h2] (B, 4D, 7, 7) -> UpBlock   -> (B, D, 14, 14)
    [., h1] (B, 2D, 14, 14) -> UpBlock -> (B, D, 28, 28)
    [., h0] (B, 2D, 28, 28) -> ConvBlock, Conv3x3 -> out (B, C, 28, 28)

The 7x7 bottleneck fixes the input size at 28x28. BatchNorm: train mode normalises by the batch,
eval mode by the running statistics.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_gelu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Conv3x3 (padding 1) -> BatchNorm -> GELU; stride 2 halves the size."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.GELU())


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convs; the size is kept."""
    return nn.Sequential(conv_bn_gelu(c_in, c_out), conv_bn_gelu(c_out, c_out))


def down_block(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the size (stride-2 conv), then a ConvBlock."""
    return nn.Sequential(conv_bn_gelu(c_in, c_out, stride=2), conv_block(c_out, c_out))


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Double the size (stride-2 transposed conv), then a ConvBlock."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.GELU(),
                         conv_block(c_out, c_out))


class SmallUNet(nn.Module):
    """(B, C, 28, 28) -> (B, C, 28, 28): two down blocks, a 7x7 -> 1x1 bottleneck, two up blocks."""

    def __init__(self, hidden: int = 32, channels: int = 1):
        super().__init__()
        D = hidden
        self.inp = conv_block(channels, D)
        self.down1 = down_block(D, D)
        self.down2 = down_block(D, 2 * D)
        self.flatten = nn.Sequential(nn.AvgPool2d(7), nn.GELU())
        self.unflatten = nn.Sequential(nn.ConvTranspose2d(2 * D, 2 * D, 7, 7), nn.BatchNorm2d(2 * D), nn.GELU())
        self.up2 = up_block(4 * D, D)
        self.up1 = up_block(2 * D, D)
        self.head = nn.Sequential(conv_block(2 * D, D), nn.Conv2d(D, channels, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.inp(x)                                      # (B, D, 28, 28)
        h1 = self.down1(h0)                                   # (B, D, 14, 14)
        h2 = self.down2(h1)                                   # (B, 2D, 7, 7)
        h = self.unflatten(self.flatten(h2))                  # (B, 2D, 1, 1) -> (B, 2D, 7, 7)
        h = self.up2(torch.cat([h, h2], dim=1))               # (B, 4D, 7, 7) -> (B, D, 14, 14)
        h = self.up1(torch.cat([h, h1], dim=1))               # (B, 2D, 14, 14) -> (B, D, 28, 28)
        return self.head(torch.cat([h, h0], dim=1))           # (B, 2D, 28, 28) -> (B, C, 28, 28)
