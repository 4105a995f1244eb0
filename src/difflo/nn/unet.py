"""A class-conditional UNet (Ho et al. 2020, App. B; Dhariwal & Nichol 2021), sized by config.

``UNet(cfg)(x, time, y) -> out`` with x, out: (B, C, H, W), time: (B,) float (any scale; it goes
through a sinusoidal embedding), y: (B,) int class labels in [0, num_classes], where the extra
index ``num_classes`` is the null class used for classifier-free guidance.

``guidance_input`` (a distilled student that takes the guidance scale as an input; Meng et al. 2023, "On
Distillation of Guided Diffusion Models", Sec. 3.1): ``forward(..., w=(B,))`` adds an embedding of w (the same
sinusoids of ``W_SCALE * w``, then an MLP whose last layer starts at zero, so a new student computes what its
teacher does at every w) to the time and class embedding. Without ``w`` it takes w = 1 (the conditional model).

**Where the time/class embedding enters a ResBlock.** By default it is added to the features before the
second GroupNorm (Ho et al. 2020). A GroupNorm subtracts each group's mean, so a per-channel constant
survives only as its deviation from the group's mean: with one channel per group (difflo's group count is the
largest divisor <= 32 of the width, so every width <= 32) the added embedding is removed entirely, and with two
channels per group (48, 64) half of it. ``scale_shift`` (Dhariwal & Nichol 2021, Sec. 3, "adaptive group
normalization"; diffusers' ``resnet_time_scale_shift="scale_shift"``): the embedding's projection gives
(scale, shift) and h = GroupNorm(h) (1 + scale) + shift, after the norm, at every width.

Layout: conv_in -> down levels (``num_res_blocks`` ResBlocks each, self-attention where the
resolution is in ``attn_resolutions``, then a stride-2 conv except at the last level) -> middle
(ResBlock, attention, ResBlock) -> up levels (``num_res_blocks + 1`` ResBlocks over the
concatenated skips, then nearest-neighbour upsampling + conv) -> GroupNorm, SiLU, conv_out.
The image size must be divisible by 2^(levels - 1): 28 = 4 * 7 works with two downsamplings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    in_channels: int = 1               # image channels (1 grey, 3 RGB)
    image_size: int = 28               # H = W
    num_classes: int = 10              # 0 = unconditional; the null class is index num_classes
    channels: int = 32                 # base width
    channel_mult: tuple[int, ...] = (1, 2, 2)   # width multiplier per level; len = number of levels
    num_res_blocks: int = 1            # ResBlocks per level on the way down
    attn_resolutions: tuple[int, ...] = (7,)    # feature-map sizes that get self-attention
    attn_heads: int = 1
    dropout: float = 0.0
    guidance_input: bool = False       # takes the guidance scale w as an input (a difflo distill --w-range student)
    scale_shift: bool = False          # the embedding scales and shifts the normalised features (adaptive GroupNorm)

    def validate(self) -> list[str]:
        """Problems with this config, as (key, message) strings; empty when it is usable."""
        errors = []
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            errors.append(f"model.image_size={self.image_size} is not divisible by 2^(levels-1)={factor} "
                          f"(levels = len(model.channel_mult) = {len(self.channel_mult)}): use fewer levels or "
                          f"another image size")
        sizes = {self.image_size // 2**i for i in range(len(self.channel_mult))}
        for r in self.attn_resolutions:
            if r not in sizes:
                errors.append(f"model.attn_resolutions contains {r}, which is not one of the UNet's feature-map "
                              f"sizes {sorted(sizes, reverse=True)}")
        if self.channels < 1 or any(m < 1 for m in self.channel_mult) or not self.channel_mult:
            errors.append("model.channels and model.channel_mult must be positive")
        if self.num_res_blocks < 1:
            errors.append("model.num_res_blocks must be >= 1")
        if self.in_channels < 1 or self.image_size < 1 or self.num_classes < 0:
            errors.append(f"model.in_channels={self.in_channels}, image_size={self.image_size} must be >= 1 and "
                          f"num_classes={self.num_classes} >= 0")
        if self.attn_heads < 1:
            errors.append("model.attn_heads must be >= 1")
        for m in self.channel_mult if self.attn_heads >= 1 else ():
            if (self.channels * m) % self.attn_heads:
                errors.append(f"model.attn_heads={self.attn_heads} must divide every level's width")
                break
        if not 0.0 <= self.dropout < 1.0:
            errors.append("model.dropout must be in [0, 1)")
        return errors


def _groups(ch: int) -> int:
    """The largest group count <= 32 that divides ch (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(32, ch) + 1) if ch % g == 0)


def timestep_embedding(time: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5): [cos(time f_k), sin(time f_k)],
    f_k = max_period^(-k / (dim/2)). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=time.device, dtype=torch.float32) / half)
    args = time.float()[:, None] * freqs[None]                       # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


W_SCALE = 100.0        # w in [0, 10] spans the sinusoids as time in [0, 1000] does


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + time/class embedding, GroupNorm -> SiLU -> dropout -> conv,
    plus a (1x1-projected) skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)    # (scale, shift) or the added vector
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                         # (B, c_out, H, W)
        e = self.emb(F.silu(emb))[:, :, None, None]                   # (B, c_out or 2 c_out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)   # each (B, heads, HW, C/heads)
        # contiguous q, k, v: SDPA takes its fused (flash) CPU kernel, not the math fallback that
        # materialises the (HW, HW) attention matrix (about half the time at 16x16 in an A/B)
        h = F.scaled_dot_product_attention(q, k, v)                   # (B, heads, HW, C/heads)
        h = h.permute(0, 1, 3, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        errors = cfg.validate()
        if errors:
            raise ValueError("; ".join(errors))
        self.cfg = cfg
        ch, emb_dim = cfg.channels, 4 * cfg.channels
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None
        self.w_mlp = (nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), zero_init(nn.Linear(emb_dim, emb_dim)))
                      if cfg.guidance_input else None)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # Down path: remember the width of every skip connection.
        self.down = nn.ModuleList()
        skips, c, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([ResBlock(c, ch * mult, emb_dim, cfg.dropout, cfg.scale_shift)])
                c = ch * mult
                if res in cfg.attn_resolutions:
                    block.append(Attention(c, cfg.attn_heads))
                self.down.append(block)
                skips.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, cfg.dropout, cfg.scale_shift), Attention(c, cfg.attn_heads),
                                  ResBlock(c, c, emb_dim, cfg.dropout, cfg.scale_shift)])

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(c + skips.pop(), ch * mult, emb_dim, cfg.dropout, cfg.scale_shift)])
                c = ch * mult
                if res in cfg.attn_resolutions:
                    block.append(Attention(c, cfg.attn_heads))
                self.up.append(block)
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
                res *= 2

        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = zero_init(nn.Conv2d(c, cfg.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None,
                class_weights: torch.Tensor | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
        """``class_weights`` (optional, (B, num_classes + 1)): use the mix ``sum_k w_k E[k]`` of the class
        embeddings (the null class is row num_classes) instead of ``E[y]``; a one-hot row gives exactly
        ``E[y]``. Summed elementwise in float32 (not a matmul, which autocast would lower). ``w`` ((B,) or a
        number): the guidance scale of a ``guidance_input`` network (default 1); refused by any other."""
        emb = self.time_mlp(timestep_embedding(time, self.cfg.channels))   # (B, 4ch)
        if self.w_mlp is not None:
            w = torch.as_tensor(1.0 if w is None else w, device=x.device, dtype=torch.float32).expand(x.shape[0])
            emb = emb + self.w_mlp(timestep_embedding(W_SCALE * w, self.cfg.channels))
        elif w is not None:
            raise ValueError("w: this UNet has no guidance input (model.guidance_input is false)")
        if self.class_emb is not None and class_weights is not None:
            table = self.class_emb.weight                                    # (num_classes + 1, 4ch)
            emb = emb + (class_weights.to(table)[:, :, None] * table[None]).sum(1)
        elif self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.cfg.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(y)

        h = self.conv_in(x)                                                  # (B, ch, H, W)
        hs = [h]
        for block in self.down:
            h = _run(block, h, emb)
            hs.append(h)
        h = _run(self.mid, h, emb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = _run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))                       # (B, C, H, W)


def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h
