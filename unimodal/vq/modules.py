"""Convolutional encoder and decoder of the VQ-GAN (taming-transformers layout).

Module and parameter names match taming's ``Encoder``/``Decoder`` (``conv_in``, ``down[i].block[j]``,
``down[i].attn[j]``, ``down[i].downsample``, ``mid.block_1/attn_1/block_2``, ``norm_out``,
``conv_out``; ``up[i]...`` in the decoder), so taming-derived checkpoints (taming, Chameleon) load
key for key and others (LlamaGen, Janus, Emu3, diffusers) need only a renaming table
(`unimodal.vq.convert`).

Every norm takes an optional condition ``cond`` so blocks call them alike: `GroupNorm` ignores it,
`SpatialNorm` (MoVQ, used by Emu3's and some diffusers decoders) modulates with it. In a spatially
normalised decoder ``cond`` is the quantised latents ``[B, embed_dim, h, w]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]  # channels -> norm layer with forward(x, cond=None)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that accepts (and ignores) a condition, so blocks call every norm alike."""

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class BatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (Emu3's latent blocks) that accepts and ignores a condition."""

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class SpatialNorm(nn.Module):
    """MoVQ's spatially conditioned norm: ``GroupNorm(x) * conv_y(c) + conv_b(c)``.

    ``c`` is the condition ``[B, cond_channels, h, w]`` resized (nearest) to ``x``'s ``H, W``, so
    every decoder level is modulated by the quantised latents. Names follow Emu3 and diffusers
    (``norm_layer``, ``conv_y``, ``conv_b``).
    """

    def __init__(self, channels: int, cond_channels: int, num_groups: int = 32):
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(cond_channels, channels, 1)
        self.conv_b = nn.Conv2d(cond_channels, channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ValueError("SpatialNorm needs the quantised latents as `cond`; call the decoder with them")
        c = F.interpolate(cond.to(x.dtype), size=x.shape[-2:], mode="nearest")  # [B, cond_channels, H, W]
        return self.norm_layer(x) * self.conv_y(c) + self.conv_b(c)


def group_norm(num_groups: int) -> NormFactory:
    """Factory of taming's norm: ``GroupNorm(num_groups, eps=1e-6)``."""
    return lambda channels: GroupNorm(num_groups, channels, eps=1e-6, affine=True)


def spatial_norm(cond_channels: int, num_groups: int) -> NormFactory:
    """Factory of `SpatialNorm` layers conditioned on ``cond_channels``-channel latents."""
    return lambda channels: SpatialNorm(channels, cond_channels, num_groups)


class ResnetBlock(nn.Module):
    """Norm -> swish -> conv, twice, plus a (1x1-projected when widths differ) skip.

    ``norm`` builds the two norms (default: taming's GroupNorm with ``num_groups`` groups).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        num_groups: int = 32,
        norm: NormFactory | None = None,
    ):
        super().__init__()
        norm = norm or group_norm(num_groups)
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming calls the 1x1 skip projection "nin_shortcut" (network-in-network)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(F.silu(self.norm1(x, cond)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h, cond))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``H*W`` positions, with 1x1-conv projections."""

    def __init__(self, channels: int, num_groups: int = 32, norm: NormFactory | None = None):
        super().__init__()
        self.norm = (norm or group_norm(num_groups))(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:  # [B, C, H, W] -> same
        b, c, h, w = x.shape
        hn = self.norm(x, cond)

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
    """Resnet -> attention -> resnet at the lowest resolution (taming's ``mid``); the attention is
    left out when ``attention`` is false (Chameleon ``attn_type: none``, diffusers
    ``mid_block_add_attention=False``)."""

    def __init__(self, channels: int, dropout: float, norm: NormFactory, attention: bool = True):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm=norm)
        self.attn_1 = AttnBlock(channels, norm=norm) if attention else None
        self.block_2 = ResnetBlock(channels, channels, dropout, norm=norm)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.block_1(x, cond)
        if self.attn_1 is not None:
            x = self.attn_1(x, cond)
        return self.block_2(x, cond)


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

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x, cond)
            if len(self.attn):
                x = self.attn[j](x, cond)
        resample = getattr(self, self._resample_name, None)
        return x if resample is None else resample(x)


def _latent_blocks(channels: int, n: int) -> nn.ModuleList:
    """``n`` BatchNorm residual blocks on the latents (Emu3's temporal res blocks at one frame)."""
    return nn.ModuleList(ResnetBlock(channels, channels, norm=BatchNorm) for _ in range(n))


class Encoder(nn.Module):
    """``[B, in_channels, H, W] -> [B, z_channels, H/f, W/f]`` with ``f = 2 ** (len(ch_mult) - 1)``.

    ``latent_convs`` (output widths; the last is ``z_channels``) adds 3x3 conv + swish layers after
    ``conv_out`` and ``latent_res_blocks`` BatchNorm residual blocks after those: Emu3's temporal
    downsampling and temporal res blocks, folded to the single frame of an image.
    """

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
        mid_attention: bool = True,
        latent_convs: Sequence[int] = (),
        latent_res_blocks: int = 0,
    ):
        super().__init__()
        norm = group_norm(num_groups)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            c_in, c_out = ch * in_mult[i], ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, dropout, norm=norm) for j in range(num_res_blocks)]
            attns = [AttnBlock(c_out, norm=norm) for _ in blocks] if res in attn_resolutions else []
            last = i == len(ch_mult) - 1
            self.down.append(_Level(blocks, attns, None if last else Downsample(c_out), "downsample"))
            res = res if last else res // 2
        c = ch * ch_mult[-1]
        self.mid = _Middle(c, dropout, norm, mid_attention)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, padding=1)
        widths = [z_channels, *latent_convs]
        self.latent_convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths, widths[1:]))
        self.latent_blocks = _latent_blocks(z_channels, latent_res_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        for conv in self.latent_convs:
            h = F.silu(conv(h))
        for block in self.latent_blocks:
            h = block(h)
        return h


class Decoder(nn.Module):
    """``[B, z_channels, h, w] -> [B, out_channels, h*f, w*f]``, the mirror of `Encoder`.

    ``up[i]`` is the level at the same resolution as ``encoder.down[i]`` (so it runs in reverse
    order) and has ``num_res_blocks + 1`` residual blocks, as in taming.

    With ``norm_type="spatial"`` every norm is a `SpatialNorm` conditioned on ``cond``, the
    quantised latents ``[B, cond_channels, h, w]`` (MoVQ). ``latent_res_blocks`` BatchNorm residual
    blocks then ``latent_convs`` 3x3 conv + swish layers run on the input first (Emu3's temporal
    layers at the first frame); as in Emu3 they process ``cond`` too, with the same weights.
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
        mid_attention: bool = True,
        norm_type: str = "group",
        cond_channels: int | None = None,
        latent_res_blocks: int = 0,
        latent_convs: int = 0,
    ):
        super().__init__()
        if norm_type == "spatial":
            if cond_channels is None:
                raise ValueError("norm_type='spatial' needs cond_channels (the quantised latents' channels)")
            norm = spatial_norm(cond_channels, num_groups)
        elif norm_type == "group":
            norm = group_norm(num_groups)
        else:
            raise ValueError(f"norm_type must be 'group' or 'spatial', got {norm_type!r}")
        self.norm_type = norm_type
        self.latent_blocks = _latent_blocks(z_channels, latent_res_blocks)
        self.latent_convs = nn.ModuleList(nn.Conv2d(z_channels, z_channels, 3, padding=1) for _ in range(latent_convs))
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _Middle(c, dropout, norm, mid_attention)
        res = resolution // 2 ** (len(ch_mult) - 1)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks = [
                ResnetBlock(c if j == 0 else c_out, c_out, dropout, norm=norm) for j in range(num_res_blocks + 1)
            ]
            attns = [AttnBlock(c_out, norm=norm) for _ in blocks] if res in attn_resolutions else []
            levels.insert(0, _Level(blocks, attns, Upsample(c_out) if i else None, "upsample"))
            c, res = c_out, (res * 2 if i else res)
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def _latent_layers(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.latent_blocks:
            h = block(h)
        for conv in self.latent_convs:
            h = F.silu(conv(h))
        return h

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``z``; ``cond`` (quantised latents) is needed, and only used, with spatial norms."""
        if self.norm_type != "spatial":
            cond = None
        elif cond is None:
            raise ValueError("this decoder uses spatial norms: pass the quantised latents as `cond`")
        else:
            cond = self._latent_layers(cond)
        h = self.mid(self.conv_in(self._latent_layers(z)), cond)
        for level in reversed(self.up):
            h = level(h, cond)
        return self.conv_out(F.silu(self.norm_out(h, cond)))
