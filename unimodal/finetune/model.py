"""The LM to fine-tune and its processor: a hub/local LM, one built from a config for offline runs,
extended with the image tokenizer's tokens, an already extended folder, or a unified base
(Chameleon / Emu3 / Janus folder: `unimodal.bases`, nothing added to its vocabulary)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import torch
from transformers import PreTrainedModel

from ..bases import UnifiedBase, base_for, processor_base
from ..errors import UserError, bad_input
from ..extend import add_image_tokens, new_token_ids
from ..offline import build_causal_lm
from ..processor import PROCESSOR_CONFIG_NAME, UnimodalProcessor
from ..training import chunk_mlps
from .args import ModelArguments
from .lora import LoraArguments, apply_lora


def is_extended(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a unimodal folder (LM + processor) rather than a plain LM."""
    if Path(path).is_dir():
        return (Path(path) / PROCESSOR_CONFIG_NAME).exists()
    from transformers.utils import cached_file  # a Hub repo (or its offline cache)

    found = cached_file(str(path), PROCESSOR_CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
    return found is not None


def load_model_and_processor(
    args: ModelArguments, data_processor: UnimodalProcessor | None = None
) -> tuple[PreTrainedModel, UnimodalProcessor]:
    """The LM to fine-tune and its processor; ``data_processor`` supplies the default image
    tokenizer. Call it before creating the Accelerator (see docs/distributed.md, ZeRO-3)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    path = args.model_name_or_path
    base = base_for(path) if path else None
    if base is not None:  # Chameleon / Emu3 / Janus: their own vocabulary, format and VQ model
        model = cast(PreTrainedModel, base.load_model(str(path), dtype=dtype))
        return model, base_processor(base, str(path), data_processor)
    if path and is_extended(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, UnimodalProcessor.from_pretrained(path)
    tokenizer_path = args.tokenizer_name_or_path or path
    if tokenizer_path is None:
        raise UserError("a model built from a config needs tokenizer_name_or_path: the text tokenizer "
                        "the data was tokenised with (before image tokens were added)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = (AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if path
             else build_model(args.build, tokenizer).to(dtype))
    if args.image_tokenizer_path:
        image_tokenizer = AutoModel.from_pretrained(args.image_tokenizer_path)
    elif data_processor is not None:
        image_tokenizer = data_processor.image_tokenizer
    else:
        raise UserError("no image tokenizer: set image_tokenizer_path or give pre-tokenised data")
    return model, add_image_tokens(model, tokenizer, image_tokenizer, image_rows_init=args.image_rows_init)


def prepare_model(model_args: ModelArguments, lora_args: LoraArguments, data_processor: UnimodalProcessor,
                  gradient_checkpointing: bool = False, mlp_chunk_size: int = 0
                  ) -> tuple[torch.nn.Module, UnimodalProcessor]:
    """The model the fine-tuning recipe trains and its processor: `load_model_and_processor`, then
    gradient checkpointing (non-reentrant; with ``mlp_chunk_size`` > 0 each MLP's backward in
    chunks of that many tokens, `chunk_mlps`) and LoRA as asked (a unified base applies LoRA in its
    own way, e.g. Janus's generation head; else `apply_lora` with the new token rows trained)."""
    if mlp_chunk_size < 0:
        raise UserError(f"mlp_chunk_size must be >= 0 tokens (0: off), got {mlp_chunk_size}")
    lm, processor = load_model_and_processor(model_args, data_processor)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mlp_chunk_size > 0:
            chunk_mlps(lm, mlp_chunk_size)
    if not lora_args.use_lora:
        return lm, processor
    unified = base_for(lm.config)
    with bad_input("LoRA"):  # a PEFT wrapper around the LM
        if unified is not None and unified.apply_lora is not None:
            return unified.apply_lora(lm, lora_args), processor
        return apply_lora(lm, new_token_ids(processor), lora_args), processor


def base_processor(base: UnifiedBase, path: str, data_processor: UnimodalProcessor | None) -> UnimodalProcessor:
    """The processor of a unified base's folder: its own when the folder has one
    (processor_config.json), else the one the data was tokenised with when it is of the same base
    (it was built from this checkpoint's tokenizer and VQ, at the data's image size), else one
    built from the model folder."""
    same_base = data_processor is not None and processor_base(data_processor) == base.name
    if same_base and not is_extended(path):
        assert data_processor is not None
        return data_processor
    return base.load_processor(path)


def build_model(build: dict, tokenizer) -> PreTrainedModel:
    """A random LM from ``build`` (`ModelArguments.build`: `build_causal_lm` keyword arguments and
    config fields), sized to ``tokenizer`` and using its special ids."""
    from_tokenizer = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                      "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    taken = sorted(set(build) & set(from_tokenizer))
    if taken:
        raise UserError(f"build: {taken} come from the text tokenizer (tokenizer_name_or_path); remove them")
    with bad_input("build"):
        return build_causal_lm(**build, **from_tokenizer)
