"""Convolutional encoder and decoder of the VQ-GAN (taming-transformers layout).

Module and parameter names match taming's ``Encoder``/``Decoder`` (``conv_in``, ``down[i].block[j]``,
``down[i].attn[j]``, ``down[i].downsample``, ``mid.block_1/attn_1/block_2``, ``norm_out``,
``conv_out``; ``up[i]...`` in the decoder), so taming-derived checkpoints (taming, Chameleon) load
key for key and others (LlamaGen, diffusers) need only a renaming table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming calls the 1x1 skip projection "nin_shortcut" (network-in-network)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``H*W`` positions, with 1x1-conv projections."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> same
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        # softmax(q k^T / sqrt(C)) v, as taming's explicit bmm, through the fused kernel
        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (right/bottom) zero padding: ``H -> H/2``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: ``H -> 2H``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Middle(nn.Module):
    """Resnet -> attention -> resnet at the lowest resolution (taming's ``mid``)."""

    def __init__(self, channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, num_groups)
        self.attn_1 = AttnBlock(channels, num_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block[j]`` (each followed by ``attn[j]`` when present) and an
    optional ``downsample``/``upsample`` at the end."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(name, resample)  # "downsample" or "upsample", as taming names it
        self._resample_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        resample = getattr(self, self._resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """``[B, in_channels, H, W] -> [B, z_channels, H/f, W/f]`` with ``f = 2 ** (len(ch_mult) - 1)``."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        num_groups: int = 32,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            c_in, c_out = ch * in_mult[i], ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, dropout, num_groups) for j in range(num_res_blocks)]
            attns = [AttnBlock(c_out, num_groups) for _ in blocks] if res in attn_resolutions else []
            last = i == len(ch_mult) - 1
            self.down.append(_Level(blocks, attns, None if last else Downsample(c_out), "downsample"))
            res = res if last else res // 2
        c = ch * ch_mult[-1]
        self.mid = _Middle(c, dropout, num_groups)
        self.norm_out = _norm(c, num_groups)
        self.conv_out = nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``[B, z_channels, h, w] -> [B, out_channels, h*f, w*f]``, the mirror of `Encoder`.

    ``up[i]`` is the level at the same resolution as ``encoder.down[i]`` (so it runs in reverse
    order) and has ``num_res_blocks + 1`` residual blocks, as in taming.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        out_channels: int,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        num_groups: int = 32,
    ):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _Middle(c, dropout, num_groups)
        res = resolution // 2 ** (len(ch_mult) - 1)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks = [
                ResnetBlock(c if j == 0 else c_out, c_out, dropout, num_groups) for j in range(num_res_blocks + 1)
            ]
            attns = [AttnBlock(c_out, num_groups) for _ in blocks] if res in attn_resolutions else []
            levels.insert(0, _Level(blocks, attns, Upsample(c_out) if i else None, "upsample"))
            c, res = c_out, (res * 2 if i else res)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, num_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
