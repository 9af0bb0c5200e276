"""Emu3 (``Emu3ForConditionalGeneration``: BAAI/Emu3-Gen-hf, BAAI/Emu3-Chat-hf) as a unified base.

What the recipes get:

- `load_model`: the transformers model itself (a causal LM over Emu3's whole vocabulary, visual
  tokens included: nothing to wrap). Its VQ model (``model.model.vqmodel``) is frozen (Emu3's VQ
  is never trained with the LM, and an unused trainable parameter would break DDP). The memory-lean
  chunked loss is exact on it (``lm_head`` is a plain ``nn.Linear``, no logit transform; tested).
- `load_processor`: `Emu3Processor` (``emu3_processor``), from a folder it saved or from the model
  folder itself (then the model's VQ weights are converted to a `VQGAN`, equal codes).
- `save_model`: ``save_pretrained`` in transformers' format (``Emu3ForConditionalGeneration.
  from_pretrained`` loads it).
- Generation: `Emu3Processor.image_decoder` (``emu3_decoder``) makes `sample_image_tokens` sample
  the ``h*w`` visual ids and feed the row ends itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import UnifiedBase, register_base
from .emu3_processor import (
    BASE_NAME,
    EOF_TOKEN,
    EOL_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_WRAPPER_TOKEN,
    Emu3Processor,
)

# Emu3-Gen's own sampling (BAAI's demo: classifier_free_guidance=3.0, top_k=2048), used when the
# model's generation_config.json carries no unimodal settings.
EMU3_SAMPLING: dict[str, Any] = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 2048, "top_p": 1.0,
                                 "do_sample": True}

# LoRA goes on the text decoder's linear layers only: "all-linear" would also reach the VQ model's
# attention projections (nn.Linear too), which Emu3 never trains.
LORA_TARGETS = r".*text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

TRAINABLE_PARTS = {
    "full": "use_lora: false: every weight of the text model (embeddings, decoder layers, lm_head); the VQ "
            "model stays frozen",
    "lora": "LoRA on the text decoder's q/k/v/o and gate/up/down projections, plus (new_token_rows: "
            "trainable_tokens, the default) the embed_tokens and lm_head rows of the visual ids and the span's "
            "control ids; new_token_rows: modules_to_save trains both matrices whole, frozen none of them",
    "image_head_rows": "Anole-style: only the lm_head rows of the visual and span control ids train (PEFT "
                       "trainable tokens), no adapters: text behaviour is untouched",
}


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **from_pretrained_kwargs) -> nn.Module:
    """``Emu3ForConditionalGeneration.from_pretrained(path)`` with its VQ model frozen and, when
    the checkpoint has none, Emu3-Gen's sampling settings (`EMU3_SAMPLING`) as its image defaults."""
    from transformers import Emu3ForConditionalGeneration

    from ..generation.sampling import SamplingConfig, set_sampling

    model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    model.model.vqmodel.requires_grad_(False).eval()
    if getattr(model.generation_config, "unimodal_image", None) is None:
        set_sampling(model, SamplingConfig(**EMU3_SAMPLING), "image")
    return model


def image_row_ids(model: nn.Module) -> list[int]:
    """The ids whose rows the "image rows" LoRA modes train: the K visual ids and the span's
    control ids, read from the model's ``vocabulary_map``."""
    emu3 = cast(Any, model)  # Emu3ForConditionalGeneration (or a PEFT wrapper of it)
    vocab = emu3.config.vocabulary_map
    named = [IMAGE_START_TOKEN, IMAGE_WRAPPER_TOKEN, EOL_TOKEN, EOF_TOKEN, IMAGE_END_TOKEN]
    return sorted({*emu3.model.vocabulary_mapping.image_tokens, *(vocab[t] for t in named)})


def apply_lora(model: nn.Module, args) -> nn.Module:
    """Wrap ``model`` for ``args.trainable_parts`` (a `LoraArguments`; modes in `TRAINABLE_PARTS`).

    ``lora``: adapters on the text decoder only (``lora_target_modules: [all-linear]`` means
    `LORA_TARGETS`: "all-linear" would also reach the VQ model's attention projections), the rows
    of `image_row_ids` as ``new_token_rows`` says. ``image_head_rows``: only those rows of lm_head.
    """
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    from ..errors import UserError

    rows = image_row_ids(model)
    parts = getattr(args, "trainable_parts", "lora")
    if parts == "image_head_rows":
        return get_peft_model(model, TrainableTokensConfig(target_modules=["lm_head"], token_indices=rows))
    if parts != "lora":
        raise UserError(f"trainable_parts {parts!r} is not an Emu3 mode; choose lora or image_head_rows "
                        "(or use_lora: false for a full fine-tune)")
    if args.new_token_rows not in ("trainable_tokens", "modules_to_save", "frozen"):
        raise UserError(f"new_token_rows must be trainable_tokens, modules_to_save or frozen, got "
                        f"{args.new_token_rows!r}")
    extra: dict = {}
    if args.new_token_rows == "trainable_tokens":
        extra["trainable_token_indices"] = {"embed_tokens": rows, "lm_head": rows}
    elif args.new_token_rows == "modules_to_save":
        extra["modules_to_save"] = ["embed_tokens", "lm_head"]
    targets = list(args.lora_target_modules)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=LORA_TARGETS if targets == ["all-linear"] else targets,
                        task_type="CAUSAL_LM", **extra)
    return get_peft_model(model, config)


def load_processor(path: str | os.PathLike) -> Emu3Processor:
    """`Emu3Processor.from_pretrained` (a folder it wrote, or an Emu3 model folder / Hub repo)."""
    return Emu3Processor.from_pretrained(path)


def save_model(model: nn.Module, folder: Path) -> None:
    """Write ``model`` (an ``Emu3ForConditionalGeneration``; merge LoRA first) in transformers' format."""
    from transformers import Emu3ForConditionalGeneration

    if not isinstance(model, Emu3ForConditionalGeneration):
        raise TypeError(f"save_model expects an Emu3ForConditionalGeneration (LoRA merged), got {type(model).__name__}")
    model.save_pretrained(folder)


register_base(UnifiedBase(name=BASE_NAME, model_types=("emu3",), load_model=load_model,
                          load_processor=load_processor, save_model=save_model, trainable_parts=TRAINABLE_PARTS,
                          apply_lora=apply_lora))

__all__ = ["EMU3_SAMPLING", "LORA_TARGETS", "TRAINABLE_PARTS", "Emu3Processor", "apply_lora", "image_row_ids",
           "load_model", "load_processor", "save_model"]
