"""Emu3's vision tokenizer (transformers ``Emu3VQVAE``), on its 2-D image path.

Emu3 tokenizes video. An image goes in as ``T = temporal_downsample_factor`` copies of itself: a
per-frame 2-D encoder, then causal temporal convs (stride 2 in time, 2 zero frames of padding)
that bring ``T`` frames down to 1, temporal residual blocks (BatchNorm3d), a ``(3,1,1)``
``quant_conv`` and plain nearest-code lookup. Decoding runs temporal blocks and x2 temporal
upsamplings on the one latent frame and then a MoVQ decoder (SpatialNorm conditioned on the
equally processed quantised latents) per frame; the image is frame 0.

All of that is exactly a 2-D computation, which is what `VQGAN` holds:

- a causal temporal conv run on one frame sees only zeros and that frame, so it equals the 2-D
  conv of its last temporal tap (temporal res blocks, ``quant_conv``/``post_quant_conv``, and the
  decoder's temporal upsampling, which makes frame 0 from frame 0 alone);
- the encoder's temporal downsampling runs on identical frames, whose outputs take a few distinct
  values (frames that see padding differ from those that do not). Stacking those values along
  channels makes each temporal conv a 2-D conv whose weight blocks are sums of its taps
  (`fold_temporal_downsampling`): ``encoder_latent_convs``.

Supported: images (any ``temporal_downsample_factor`` that is a power of two), one attention
head. Not supported: video (``T > 1`` distinct frames), ``double_latent``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .common import (
    Conversion,
    build_vqgan,
    conv_weight,
    rename,
    transformers_vq,
    vqgan_config,
)

_RENAMES = [
    (r"^encoder\.down_block\.down\.", "encoder.down."),
    (r"^decoder\.up_block\.up\.", "decoder.up."),
    (r"^(encoder|decoder)\.middle_block\.attn_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.middle_block\.", r"\1.mid."),
    (r"\.attn_norms\.(\d+)\.", r".attn.\1.norm."),
    (r"\.(attn\.\d+|attn_1)\.([qkv])_proj\.", r".\1.\2."),
    (r"\.(attn\.\d+|attn_1)\.out_proj\.", r".\1.proj_out."),
    (r"^(encoder|decoder)\.time_res_stack\.", r"\1.latent_blocks."),
    (r"^decoder\.time_conv\.(\d+)\.conv\.conv\.", r"decoder.latent_convs.\1."),
    (r"\.(conv1|conv2)\.conv\.", r".\1."),  # Emu3VQVAEConv3d wraps its nn.Conv3d as .conv
    (r"^(quant_conv|post_quant_conv)\.conv\.", r"\1."),
]


def fold_temporal_downsampling(
    convs: list[tuple[torch.Tensor, torch.Tensor]], frames: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Emu3's causal temporal downsampling, run on ``frames`` identical frames, as 2-D convs.

    Args:
        convs: ``(weight [C_out, C_in, taps, kh, kw], bias [C_out])`` per temporal conv; each
            pads 2 zero frames in front and has stride 2 in time.
        frames: number of identical input frames (``temporal_downsample_factor``).

    Returns:
        ``(weight [S_out * C_out, S_in * C_in, kh, kw], bias [S_out * C_out])`` per conv, where
        ``S`` counts the distinct frames ("slots") at that depth, stacked along channels; the last
        conv must end on one frame (``S_out = 1``).
    """
    slot_of = [0] * frames  # slot (distinct value) held by each input frame
    n_in = 1
    folded = []
    for weight, bias in convs:
        c_out, c_in, taps = weight.shape[:3]
        out_slots: dict[tuple[int | None, ...], int] = {}  # input slots read per tap (None = padding)
        next_slot_of = []
        for start in range(0, len(slot_of) + 2 - taps + 1, 2):  # windows over the padded frames
            window = tuple(slot_of[i - 2] if i >= 2 else None for i in range(start, start + taps))
            next_slot_of.append(out_slots.setdefault(window, len(out_slots)))
        w = weight.new_zeros(len(out_slots) * c_out, n_in * c_in, *weight.shape[3:], dtype=torch.float32)
        for window, s in out_slots.items():
            for tap, r in enumerate(window):
                if r is not None:
                    w[s * c_out : (s + 1) * c_out, r * c_in : (r + 1) * c_in] += weight[:, :, tap].float()
        folded.append((w, bias.float().repeat(len(out_slots))))
        slot_of, n_in = next_slot_of, len(out_slots)
    if len(slot_of) != 1:
        raise ValueError(f"{frames} frames end as {len(slot_of)} after {len(convs)} temporal downsamplings, not 1")
    return folded


def _as_2d(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A causal 3-D conv weight run on one frame -> its last temporal tap; a linear attention
    projection -> the equivalent 1x1 conv weight; anything else unchanged."""
    if tensor.ndim == 5:  # [C_out, C_in, taps, kh, kw]: frames before the first are zero padding
        return tensor[:, :, -1]
    return conv_weight(tensor) if ".attn" in key and key.endswith(".weight") else tensor


def from_emu3(source: str | os.PathLike | nn.Module, image_size: int = 512) -> Conversion:
    """Convert the vision tokenizer of a transformers Emu3 model for images (see the module doc).

    Args:
        source: an ``Emu3VQVAE`` or a model containing one (``Emu3ForConditionalGeneration``), or
            its folder / Hub repo id; of a whole model only the ``vqmodel.*`` shards are read.
        image_size: square resolution images are tokenized at (Emu3 takes any multiple of 8).
    """
    from transformers import Emu3Config, Emu3VQVAE, Emu3VQVAEConfig

    config, state_dict, name = transformers_vq(source, Emu3VQVAE, Emu3Config, Emu3VQVAEConfig)
    if config.double_latent:
        raise ValueError(f"{name}: double_latent=True (a KL encoder) is not a VQ tokenizer setting")
    if config.num_attention_heads != 1:
        raise ValueError(f"{name}: num_attention_heads={config.num_attention_heads}; VQGAN attention has one head")
    frames = config.temporal_downsample_factor
    n_temporal = round(math.log2(frames))
    if 2**n_temporal != frames:
        raise ValueError(f"{name}: temporal_downsample_factor {frames} is not a power of two")

    # the encoder's temporal downsampling, folded; every other 3-D conv keeps its last temporal tap
    time_convs = [(state_dict.pop(f"encoder.time_conv.{i}.conv.conv.weight"),
                   state_dict.pop(f"encoder.time_conv.{i}.conv.conv.bias")) for i in range(n_temporal)]
    folded = fold_temporal_downsampling(time_convs, frames)
    state_dict = {k: _as_2d(k, v) for k, v in rename(state_dict, _RENAMES).items()}
    for i, (weight, bias) in enumerate(folded):
        state_dict[f"encoder.latent_convs.{i}.weight"], state_dict[f"encoder.latent_convs.{i}.bias"] = weight, bias
    vq_config = vqgan_config(
        image_size=image_size, ch=config.base_channels, ch_mult=list(config.channel_multiplier),
        num_res_blocks=config.num_res_blocks, attn_levels=list(config.attn_resolutions),
        z_channels=config.latent_channels,
        embed_dim=config.embed_dim, codebook_size=config.codebook_size, in_channels=config.in_channels,
        out_channels=config.out_channels, use_l2_norm=False, decoder_norm="spatial",
        encoder_latent_convs=[w.shape[0] for w, _ in folded],
        latent_res_blocks=config.num_res_blocks, decoder_latent_convs=n_temporal,
    )
    notes = [f"2-D image path: the image stands for the {frames} identical frames Emu3 encodes; decoding "
             f"returns frame 0, as Emu3VQVAE.decode does for images"]
    return Conversion(build_vqgan(vq_config, state_dict, name), notes)
