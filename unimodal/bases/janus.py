"""The ``janus`` unified base: `JanusForConditionalGeneration` (Janus, Janus-Pro 1B / 7B in
transformers' format, e.g. ``deepseek-community/Janus-Pro-1B``) fine-tuned for text-to-image.

- Model: `JanusImageLM` (``janus_model``): the checkpoint's own class with image codes as virtual
  ids ``[V, V + K)`` routed through the generation embedding / aligner / head; it computes its own
  exact two-head loss (``computes_own_loss``).
- Processor: `JanusProcessor` (``janus_processor``): Janus's prompt template, image-start tag and
  unconditional prompt; the model's own VQ (`JanusImageTokenizer`, ``janus_vq``).
- Generation: `JanusProcessor.image_decoder` (``janus_decoding``) gives `sample_image_tokens` the
  generation head's logits; same ids as Janus's ``generate(generation_mode="image")`` when greedy.
- Trains: the language model and the generation embedding / aligner / head. The SigLIP vision
  encoder, its aligner and the VQ model are frozen (`load_model`); LoRA (`apply_lora`) adapts the
  language model's linear layers and trains the generation embedding / aligner / head in full.
- Saves (`save_model`) in transformers' format: `JanusForConditionalGeneration.from_pretrained`
  loads the folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..extend import unwrap_peft
from . import UnifiedBase, register_base
from .janus_model import JanusImageLM
from .janus_processor import JanusProcessor

FROZEN_MODULES = ("vision_model", "aligner", "vqmodel")  # under JanusModel: understanding path + VQ
GENERATION_MODULES = ("generation_embeddings", "generation_aligner", "generation_head")
# under use_lora (a full fine-tune, use_lora false, trains the language model and the generation
# embedding / aligner / head, with the SigLIP encoder, its aligner and the VQ model frozen)
TRAINABLE_PARTS = {
    "lora": "LoRA adapters on the language model's linear layers; generation embedding, aligner and head "
            "fully trained (modules_to_save); text embedding / lm_head, vision encoder and VQ frozen",
}


def freeze_understanding_and_vq(model: JanusImageLM) -> JanusImageLM:
    """Freeze the parts text-to-image never runs (SigLIP encoder + aligner) or must not change
    (the VQ model: the codes of the data are its codes)."""
    for name in FROZEN_MODULES:
        getattr(model.model, name).requires_grad_(False)
    return model


def load_model(path: str, dtype: torch.dtype = torch.float32, **from_pretrained_kwargs) -> JanusImageLM:
    """A Janus checkpoint folder / Hub repo as a `JanusImageLM` (understanding path and VQ frozen)."""
    model = JanusImageLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    return freeze_understanding_and_vq(model)


def load_processor(path: str) -> JanusProcessor:
    return JanusProcessor.from_pretrained(path)


def save_model(model: nn.Module, folder: Path) -> None:
    """Write ``model`` as a `JanusForConditionalGeneration` checkpoint. A PEFT model is merged into
    a copy first (LoRA folded into the weights, the trained generation modules put in place)."""
    if hasattr(model, "merge_and_unload"):
        model = cast(Any, copy.deepcopy(model)).merge_and_unload()
    base = unwrap_peft(model)
    if not isinstance(base, JanusImageLM):
        raise TypeError(f"expected a JanusImageLM, got {type(base).__name__}")
    folder = Path(folder)
    base.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["JanusForConditionalGeneration"]  # the class the folder is for
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def language_model_linears(model: JanusImageLM, names: list[str] | None = None) -> list[str]:
    """Full names of the ``nn.Linear`` layers of the language model (``names``: only those whose
    last component is listed, e.g. ``["q_proj", "v_proj"]``; None or ``["all-linear"]``: all)."""
    wanted = None if not names or names == ["all-linear"] else set(names)
    lm = model.model.language_model
    prefix = next(n for n, m in model.named_modules() if m is lm)
    return [f"{prefix}.{n}" for n, m in lm.named_modules()
            if isinstance(m, nn.Linear) and (wanted is None or n.rsplit(".", 1)[-1] in wanted)]


def apply_lora(model: nn.Module, args: Any) -> nn.Module:
    """PEFT LoRA (``args``: `unimodal.finetune.lora.LoraArguments`) on the language model's linear
    layers, with the generation embedding / aligner / head trained in full (``modules_to_save``).
    ``args.new_token_rows`` does not apply: Janus gets no new vocabulary rows."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(model, JanusImageLM):
        raise TypeError(f"janus LoRA needs the JanusImageLM that load_model returns, got {type(model).__name__}")
    mode = getattr(args, "trainable_parts", "lora")
    if mode not in TRAINABLE_PARTS:
        raise ValueError(f"trainable_parts {mode!r} is not a janus mode; janus takes {sorted(TRAINABLE_PARTS)}")
    targets = language_model_linears(model, list(args.lora_target_modules))
    if not targets:
        raise ValueError(f"lora_target_modules {args.lora_target_modules} match no linear layer of Janus's "
                         "language model (e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, modules_to_save=list(GENERATION_MODULES), task_type="CAUSAL_LM")
    return get_peft_model(freeze_understanding_and_vq(model), config)


BASE = UnifiedBase(
    name="janus",
    model_types=("janus",),
    load_model=load_model,
    load_processor=load_processor,
    save_model=save_model,
    trainable_parts=TRAINABLE_PARTS,
    apply_lora=apply_lora,
)
register_base(BASE)
