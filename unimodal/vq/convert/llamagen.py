"""LlamaGen VQ-16/VQ-8 ``.pt`` checkpoints and Janus' VQ (transformers ``JanusVQVAE``), one design.

Both are taming's encoder/decoder with attention only at the lowest resolution and
l2-normalised ``embed_dim``-dim codes (`VQGANConfig.use_l2_norm`). LlamaGen names its levels
``conv_blocks[i].res[j]`` and its middle ``mid[0..2]``; transformers' Janus uses taming's names but
stores the decoder levels in the order they run (``up[0]`` = lowest resolution), the reverse of
taming's, so both need a renaming table and nothing else.
"""

from __future__ import annotations

import os

from torch import nn

from .common import (
    Conversion,
    StateDict,
    build_vqgan,
    drop,
    level_count,
    load_checkpoint,
    rename,
    state_dict_from,
    transformers_vq,
    vqgan_config,
)
from .taming import infer_taming_arch

_JANUS_NOTE = (
    "codes follow LlamaGen/Janus (latents and codes l2-normalised before the lookup); transformers' "
    "JanusVQVAE.encode skips that normalisation, so its codes differ wherever codebook rows are not unit length"
)


def _flip_decoder_levels(prefix: str, levels: int):
    """Rule renaming ``decoder.{prefix}.{k}.`` (k-th level run) to taming's ``decoder.up.{levels-1-k}.``."""
    return rf"^decoder\.{prefix}\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}."


def from_llamagen(checkpoint: str | os.PathLike | StateDict, image_size: int = 256) -> Conversion:
    """Convert a LlamaGen VQ checkpoint (``vq_ds16_c2i.pt`` and the like).

    Args:
        checkpoint: the ``.pt`` file (weights under ``"model"``, as LlamaGen's sampling scripts read
            them, else ``"ema"`` or ``"state_dict"``), a ``.safetensors`` file of the flat state
            dict, or that state dict. The architecture (VQ-16, VQ-8, widths) is read from the tensors.
        image_size: resolution the tokenizer is used at (LlamaGen trains at 256; Janus uses 384).
    """
    notes: list[str] = []
    source = str(checkpoint) if not isinstance(checkpoint, dict) else "state dict"
    raw = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, "model")
    state_dict, key = state_dict_from(raw, ("model", "ema", "state_dict"), source)
    if key == "model" and "ema" in raw:
        notes.append("used the 'model' weights, as LlamaGen's sampling scripts do; the 'ema' copy was ignored")
    state_dict = drop(state_dict, {"quantize.codebook_used": "codebook usage statistics: training only"}, notes)
    levels = level_count(state_dict, "decoder.conv_blocks")
    state_dict = rename(state_dict, [
        (r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block."),
        (r"^encoder\.conv_blocks\.", "encoder.down."),
        _flip_decoder_levels("conv_blocks", levels),
        (r"^decoder\.up\.(\d+)\.res\.", r"decoder.up.\1.block."),
        (r"\.mid\.0\.", ".mid.block_1."),
        (r"\.mid\.1\.", ".mid.attn_1."),
        (r"\.mid\.2\.", ".mid.block_2."),
    ])
    arch, attn_levels, mid_attention = infer_taming_arch(state_dict, image_size)
    config = vqgan_config(attn_levels=attn_levels, mid_attention=mid_attention, use_l2_norm=True, **arch)
    return Conversion(build_vqgan(config, state_dict, source), notes)


def from_janus(source: str | os.PathLike | nn.Module, image_size: int | None = None) -> Conversion:
    """Convert the VQ of a transformers Janus / Janus-Pro model.

    Args:
        source: a ``JanusVQVAE`` or a model containing one (``JanusForConditionalGeneration``), or
            its folder / Hub repo id; of a whole model only the ``vqmodel.*`` shards are read.
        image_size: defaults to ``num_patches * f`` (384 for Janus-Pro).
    """
    from transformers import JanusConfig, JanusVQVAE, JanusVQVAEConfig

    config, state_dict, name = transformers_vq(source, JanusVQVAE, JanusConfig, JanusVQVAEConfig)
    if config.double_latent:
        raise ValueError(f"{name}: double_latent=True (a KL encoder) is not a VQ tokenizer setting")
    levels = len(config.channel_multiplier)
    arch = dict(
        ch=config.base_channels, ch_mult=list(config.channel_multiplier), num_res_blocks=config.num_res_blocks,
        z_channels=config.latent_channels, embed_dim=config.embed_dim, codebook_size=config.num_embeddings,
        in_channels=config.in_channels, out_channels=config.out_channels, dropout=config.dropout,
    )
    vq_config = vqgan_config(
        image_size=image_size or config.num_patches * 2 ** (levels - 1),
        attn_levels=[levels - 1], use_l2_norm=True, **arch,
    )
    state_dict = rename(state_dict, [_flip_decoder_levels("up", levels)])
    return Conversion(build_vqgan(vq_config, state_dict, name), [_JANUS_NOTE])
