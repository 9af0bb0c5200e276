"""taming-transformers / latent-diffusion / Chameleon VQ-GAN checkpoints (Lightning ``.ckpt`` + yaml).

These share taming's ``VQModel`` parameter names with `VQGAN`, so the weights load key for key;
the work is reading the architecture from the yaml (``model.params.ddconfig``) and leaving the
training-only tensors behind: ``loss.*`` (discriminator, LPIPS), ``model_ema.*`` and EMA codebook
statistics.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .common import (
    Conversion,
    StateDict,
    build_vqgan,
    drop,
    level_count,
    load_checkpoint,
    state_dict_from,
    vqgan_config,
)

_TRAINING_ONLY = {
    "loss.": "discriminator and perceptual (LPIPS) loss: training only",
    "model_ema.": "EMA copy of the weights kept by latent-diffusion's trainer; the live weights are used",
    "quantize.embedding.cluster_size": "EMA codebook statistics: training only",
    "quantize.embedding.embed_avg": "EMA codebook statistics: training only",
}
_ATTENTION_TYPES = {"vanilla", "vanilla-xformers", "none"}  # same maths; "none" = no attention at all


def read_taming_yaml(path: str | os.PathLike) -> dict:
    """``model.params`` of a taming/LDM config (or the yaml itself when it holds ``ddconfig``)."""
    config = yaml.safe_load(Path(path).read_text())
    params = config.get("model", {}).get("params", config) if isinstance(config, dict) else None
    if not isinstance(params, dict) or "ddconfig" not in params:
        raise ValueError(f"{path}: expected a taming/latent-diffusion config with model.params.ddconfig")
    target = str(config.get("model", {}).get("target", ""))
    if "Gumbel" in target:
        raise ValueError(f"{path}: {target} uses a Gumbel-softmax quantizer, which VQGAN does not implement")
    if params.get("remap"):
        raise ValueError(f"{path}: remapped codebooks (model.params.remap) are not supported")
    return params


def _arch_from_yaml(params: dict, image_size: int | None) -> tuple[dict, list[int], bool]:
    dd = params["ddconfig"]
    for key in ("double_z", "tanh_out", "give_pre_end"):
        if dd.get(key):
            raise ValueError(f"ddconfig.{key}: true is not a VQ tokenizer setting VQGAN supports")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in _ATTENTION_TYPES:
        raise ValueError(f"ddconfig.attn_type {attn_type!r} is not supported (only {sorted(_ATTENTION_TYPES)})")
    resolution = int(dd["resolution"])
    levels = range(len(dd["ch_mult"]))
    attn_levels = [] if attn_type == "none" else [i for i in levels if resolution // 2**i in dd["attn_resolutions"]]
    arch = dict(
        image_size=image_size or resolution, ch=dd["ch"], ch_mult=list(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"], z_channels=dd["z_channels"], in_channels=dd.get("in_channels", 3),
        out_channels=dd.get("out_ch", 3), dropout=dd.get("dropout", 0.0), embed_dim=params["embed_dim"],
        codebook_size=params["n_embed"],
    )
    return arch, attn_levels, attn_type != "none"


def infer_taming_arch(state_dict: StateDict, image_size: int) -> tuple[dict, list[int], bool]:
    """Architecture of a state dict in taming's names, read from the tensor names and shapes."""
    levels = level_count(state_dict, "encoder.down")
    required = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight", "quant_conv.weight",
                "quantize.embedding.weight")
    if not levels or any(key not in state_dict for key in required):
        raise ValueError(
            f"these weights are not in taming's layout (no encoder.down.* or one of {required}); "
            f"check --format (LlamaGen checkpoints use --format llamagen)"
        )
    conv_in = state_dict["encoder.conv_in.weight"]  # [ch, in_channels, 3, 3]
    ch = conv_in.shape[0]
    arch = dict(
        image_size=image_size, ch=ch, in_channels=conv_in.shape[1],
        ch_mult=[state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)],
        num_res_blocks=level_count(state_dict, "encoder.down.0.block"),
        z_channels=state_dict["encoder.conv_out.weight"].shape[0],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
        embed_dim=state_dict["quant_conv.weight"].shape[0],
        codebook_size=state_dict["quantize.embedding.weight"].shape[0],
    )
    attn_levels = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state_dict]
    return arch, attn_levels, "encoder.mid.attn_1.q.weight" in state_dict


def from_taming(
    checkpoint: str | os.PathLike | StateDict,
    config: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> Conversion:
    """Convert a taming-transformers, latent-diffusion or Chameleon VQ-GAN.

    Args:
        checkpoint: the Lightning ``.ckpt`` (weights under ``"state_dict"``), a ``.safetensors`` /
            ``.pt`` file with the flat state dict, or that state dict itself.
        config: the yaml it was trained with (Chameleon ships ``vqgan.yaml``). Without it the
            architecture is read from the tensor shapes and ``image_size`` defaults to 256.
        image_size: override the training resolution (``ddconfig.resolution``) stored in the config.
    """
    notes: list[str] = []
    source = str(checkpoint) if not isinstance(checkpoint, dict) else "state dict"
    raw = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, "state_dict")
    state_dict, _ = state_dict_from(raw, ("state_dict",), source)
    state_dict = drop(state_dict, _TRAINING_ONLY, notes)
    if config is not None:
        arch, attn_levels, mid_attention = _arch_from_yaml(read_taming_yaml(config), image_size)
    else:
        arch, attn_levels, mid_attention = infer_taming_arch(state_dict, image_size or 256)
        notes.append(f"no yaml given: architecture read from the tensor shapes, image_size={arch['image_size']}")
    unknown_quantizer = sorted(k for k in state_dict if k.startswith("quantize.") and k != "quantize.embedding.weight")
    if unknown_quantizer:
        raise ValueError(f"{source}: quantizer tensors {unknown_quantizer} are not a plain VQ codebook")
    vq_config = vqgan_config(attn_levels=attn_levels, mid_attention=mid_attention, use_l2_norm=False, **arch)
    return Conversion(build_vqgan(vq_config, state_dict, source), notes)

