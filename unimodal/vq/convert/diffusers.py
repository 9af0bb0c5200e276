"""diffusers ``VQModel`` (latent-diffusion VQ-f4/f8, Kandinsky's MoVQ, aMUSEd's VQ-GAN).

diffusers rebuilt taming's VQ-GAN with its own names (``down_blocks[i].resnets[j]``,
``mid_block.attentions.0.to_q`` as linear layers, ``conv_shortcut``, decoder ``up_blocks`` in run
order), per-level attention chosen by block type (``Attn*Block2D``), an optional middle attention
and optional spatial (MoVQ) norms in the decoder. The computation is taming's, so the weights map
1:1 onto `VQGAN` after renaming.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, cast

from torch import nn

from .common import (
    Conversion,
    Rule,
    StateDict,
    build_vqgan,
    conv_weight,
    hf_file_getter,
    read_hf_weights,
    rename,
    vqgan_config,
)

_DOWN = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # block type -> has attention
_UP = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
_IGNORED = {
    "scaling_factor": "only rescales latents for latent diffusion",
    "force_upcast": "a dtype hint for diffusers pipelines",
    "lookup_from_codebook": "VQGAN.decode always looks codes up in the codebook",
}


def _rules(levels: int) -> list[Rule]:
    return [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        # decoder up_blocks run lowest resolution first; taming's up[i] is at encoder level i
        (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}."),
        (r"^decoder\.up\.(\d+)\.resnets\.", r"decoder.up.\1.block."),
        (r"^decoder\.up\.(\d+)\.attentions\.", r"decoder.up.\1.attn."),
        (r"^decoder\.up\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.(group_norm|spatial_norm)\.", ".norm."),
        (r"\.to_([qkv])\.", r".\1."),
        (r"\.to_out\.0\.", ".proj_out."),
    ]


def _diffusers_source(source) -> tuple[dict, StateDict, str]:
    """``(config dict, state dict, name)`` of a ``VQModel``, its folder, a pipeline folder holding
    one (e.g. ``movq/``, ``vqvae/``), or a Hub repo of either."""
    if isinstance(source, nn.Module):
        if type(source).__name__ != "VQModel":
            raise TypeError(f"expected a diffusers VQModel, got {type(source).__name__}")
        # diffusers' ConfigMixin keeps its config as a FrozenDict
        return dict(cast(Mapping[str, Any], source.config)), source.state_dict(), "VQModel"
    get = hf_file_getter(source)
    subfolder = ""
    if get("config.json") is None and (index := get("model_index.json")) is not None:
        components = json.loads(index.read_text())
        found = [name for name, spec in components.items() if isinstance(spec, list) and spec[-1] == "VQModel"]
        if not found:
            raise ValueError(f"{source}: this pipeline has no VQModel component ({sorted(components)})")
        subfolder = found[0] + "/"
    config_file = get(subfolder + "config.json")
    if config_file is None:
        raise FileNotFoundError(f"{source}: no config.json; pass a diffusers VQModel folder or Hub repo")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") != "VQModel":
        raise ValueError(f"{source}: config is for {config.get('_class_name')!r}, not a diffusers VQModel")
    weights = read_hf_weights(lambda name: get(subfolder + name), lambda k: True, str(source))
    return config, weights, str(source) + (f" ({subfolder[:-1]})" if subfolder else "")


def from_diffusers(source: str | os.PathLike | nn.Module, image_size: int | None = None) -> Conversion:
    """Convert a diffusers ``VQModel`` (an instance, a folder, a pipeline folder, or a Hub repo).

    Args:
        image_size: defaults to the config's ``sample_size``.
    """
    config, state_dict, name = _diffusers_source(source)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    unknown = sorted({t for t in down if t not in _DOWN} | {t for t in up if t not in _UP})
    if unknown:
        raise ValueError(f"{name}: block types {unknown} are not supported (only {sorted(_DOWN | _UP)})")
    levels = len(down)
    attn_levels = [i for i, t in enumerate(down) if _DOWN[t]]
    if sorted(levels - 1 - i for i, t in enumerate(up) if _UP[t]) != attn_levels:
        raise ValueError(f"{name}: attention at different levels in encoder {down} and decoder {up}; "
                         f"VQGAN places attention symmetrically")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"{name}: act_fn {config['act_fn']!r}; VQGAN uses silu (swish)")
    channels = list(config["block_out_channels"])
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"{name}: block_out_channels {channels} are not multiples of the first")
    norm_type, groups = config.get("norm_type", "group"), config.get("norm_num_groups", 32)
    if norm_type == "spatial" and groups != 32:
        raise ValueError(f"{name}: diffusers' SpatialNorm always uses 32 groups, but norm_num_groups={groups}")
    latent = config.get("latent_channels", 3)
    vq_config = vqgan_config(
        image_size=image_size or config.get("sample_size", 32), ch=ch, ch_mult=[c // ch for c in channels],
        num_res_blocks=config.get("layers_per_block", 1), attn_levels=attn_levels,
        mid_attention=config.get("mid_block_add_attention", True), z_channels=latent,
        embed_dim=config.get("vq_embed_dim") or latent, codebook_size=config.get("num_vq_embeddings", 256),
        in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
        num_groups=groups, decoder_norm=norm_type, use_l2_norm=False,
    )
    state_dict = {k: conv_weight(v) if ".attn" in k and k.endswith(".weight") and v.ndim == 2 else v
                  for k, v in rename(state_dict, _rules(levels)).items()}
    notes = [f"ignored config {key}={config[key]!r}: {why}" for key, why in _IGNORED.items()
             if config.get(key) not in (None, False)]
    return Conversion(build_vqgan(vq_config, state_dict, name), notes)
