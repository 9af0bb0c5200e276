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

import torch
from torch import nn

from . import UnifiedBase, register_base
from .emu3_processor import BASE_NAME, Emu3Processor

# Emu3-Gen's own sampling (BAAI's demo: classifier_free_guidance=3.0, top_k=2048), used when the
# model's generation_config.json carries no unimodal settings.
EMU3_SAMPLING = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 2048, "top_p": 1.0, "do_sample": True}

TRAINABLE_PARTS = {
    "full": "every weight of the text model (embeddings, decoder layers, lm_head); the VQ model stays frozen",
    "lora": "LoRA adapters on the decoder layers' linear layers (q/k/v/o_proj, gate/up/down_proj); "
            "embeddings, lm_head and the VQ model frozen",
    "lora+head": "as lora, plus lm_head trained in full (modules_to_save): the visual-token rows learn a new "
                 "image distribution",
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
                          load_processor=load_processor, save_model=save_model, trainable_parts=TRAINABLE_PARTS))

__all__ = ["EMU3_SAMPLING", "Emu3Processor", "load_model", "load_processor", "save_model"]
