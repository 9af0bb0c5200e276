"""The Chameleon / Anole model as unimodal trains and samples it.

transformers' `ChameleonForConditionalGeneration.forward` sets the logits of every image id to the
dtype's minimum (Chameleon-7b was released with image generation disabled). That breaks three
things here: image generation (no image id can be sampled), the model's own loss on image targets
(``-log softmax`` of ``finfo.min``: ~3.4e38) and the chunked loss (its one-time probe sees logits
it cannot reproduce and refuses). Anole's fix is to drop the mask; `ChameleonImageLM` is that
model class: the same modules and weights, a forward that returns the head's logits unchanged,
and `save_pretrained` writing ``"architectures": ["ChameleonForConditionalGeneration"]`` so the
saved folder is an ordinary Chameleon checkpoint.

For a model loaded by the user with transformers' own class, `ChameleonBackboneDecoder` samples
images anyway: it runs the backbone (``model.model``) and applies the image rows of the head itself.

Trainable parts (`apply_lora`, ``LoraArguments.trainable_parts``):

- full fine-tune (``use_lora: false``): every LM weight; the VQ encoder inside the model
  (``model.model.vqmodel``, only used for ``pixel_values`` inputs) is frozen.
- ``lora``: LoRA adapters on every linear layer of the transformer, plus PEFT trainable tokens for
  the image / ``<racm3:break>`` / ``<eoss>`` rows of the input embedding and of the (untied) head.
- ``image_head_rows``: Anole's recipe: only the lm_head rows of the image ids train (PEFT
  trainable tokens on ``lm_head``); nothing else changes, so text behaviour is untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import nn
from transformers import ChameleonForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from ..errors import UserError
from ..generation.decoder import KVDecoder
from ..generation.static import StaticKVDecoder

ARCHITECTURE = "ChameleonForConditionalGeneration"
TRAINABLE_PARTS = {
    "full": "use_lora: false: every LM weight trains (the VQ encoder inside the model stays frozen)",
    "lora": "LoRA adapters on all linear layers + trainable image/<racm3:break>/<eoss> rows of the "
            "input embedding and lm_head",
    "image_head_rows": "Anole-style: only the lm_head rows of the image ids train (no adapters)",
}


class ChameleonImageLM(ChameleonForConditionalGeneration):
    """`ChameleonForConditionalGeneration` whose forward does not mask the image-token logits.

    Same parameters and state dict; ``save_pretrained`` writes a folder that transformers' own class
    loads (``architectures`` is set back to ``ChameleonForConditionalGeneration``).
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As the parent's forward (logits ``[B, T', V]``, shifted-label loss), without the mask."""
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save, then ``architectures`` back to ``ChameleonForConditionalGeneration``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = [ARCHITECTURE]
        config_file = Path(save_directory) / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            config["architectures"] = [ARCHITECTURE]
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_model(path: str, dtype: torch.dtype = torch.float32, **from_pretrained_kwargs) -> ChameleonImageLM:
    """A Chameleon / Anole folder or Hub repo as `ChameleonImageLM`, its VQ encoder frozen."""
    model = ChameleonImageLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    return prepare(model)


def prepare(model: ChameleonImageLM) -> ChameleonImageLM:
    """Freeze the VQ encoder (unused by id inputs; DDP and ZeRO want every trainable param used)."""
    model.model.vqmodel.requires_grad_(False)
    return model


def save_model(model: nn.Module, folder: Path) -> None:
    """Write ``model`` as a Chameleon checkpoint (`ChameleonForConditionalGeneration` loads it)."""
    if not isinstance(model, ChameleonForConditionalGeneration):
        raise TypeError(f"expected a Chameleon model, got {type(model).__name__}")
    model.save_pretrained(folder)  # ChameleonImageLM writes transformers' architecture name


def _unwrap(model: nn.Module) -> ChameleonForConditionalGeneration:
    """The Chameleon model inside a PEFT wrapper."""
    inner: Any = model
    if hasattr(type(inner), "get_base_model"):
        inner = inner.get_base_model()
    if not isinstance(inner, ChameleonForConditionalGeneration):
        raise TypeError(f"expected a Chameleon model, got {type(inner).__name__}")
    return inner


class ChameleonBackboneDecoder(KVDecoder):
    """`KVDecoder` for transformers' own (masking) class: the backbone's last hidden states
    ``[B, keep, H]`` go through the (row-sliced) head here, so the mask never applies."""

    def _call(self, kwargs: dict) -> Any:
        keep = kwargs.pop("logits_to_keep")
        inner = _unwrap(self.model)
        out = inner.model(**kwargs)
        head = inner.get_output_embeddings()  # the row-sliced head while KVDecoder swaps it in
        return SimpleNamespace(logits=head(out.last_hidden_state[:, -keep:]), cache=out.cache)


def image_decoder(model: nn.Module, vocab_slice: tuple[int, int], max_length: int, static_cache: bool,
                  compile: bool | str, stats: Any) -> KVDecoder:
    """The `sample_image_tokens` decoder for a Chameleon model (see `generation.images`)."""
    inner = _unwrap(model)
    if isinstance(inner, ChameleonImageLM):  # unmasked forward: the standard decoders apply
        if static_cache or compile:
            return StaticKVDecoder(model, vocab_slice, max_length, compile, stats)
        return KVDecoder(model, vocab_slice=vocab_slice)
    if static_cache or compile:
        raise ValueError("static_cache / compile need the model loaded with unimodal.bases.chameleon.load_model "
                         "(transformers' ChameleonForConditionalGeneration masks image logits in its forward); "
                         "drop static_cache and compile, or reload the model")
    return ChameleonBackboneDecoder(model, vocab_slice=vocab_slice)


def image_ids(model: nn.Module) -> list[int]:
    """The ids of the image tokens (``IMGIMG...Z``), sorted, from the model's vocabulary map."""
    return list(_unwrap(model).model.vocabulary_mapping.image_tokens)


def control_ids(model: nn.Module) -> list[int]:
    """``<racm3:break>`` and ``<eoss>`` ids from the vocabulary map (those present)."""
    vocab_map = _unwrap(model).config.vocabulary_map or {}
    return [int(vocab_map[t]) for t in ("<racm3:break>", "<eoss>") if t in vocab_map]


def apply_lora(model: nn.Module, args: Any) -> nn.Module:
    """Wrap ``model`` for ``args.trainable_parts`` (`TRAINABLE_PARTS`; ``args``: LoraArguments)."""
    from peft import TrainableTokensConfig, get_peft_model

    from ..finetune.lora import apply_lora as lora_with_rows

    parts = getattr(args, "trainable_parts", "lora")
    rows = image_ids(model)
    if parts == "lora":
        return lora_with_rows(cast(Any, model), sorted({*rows, *control_ids(model)}), args)
    if parts == "image_head_rows":
        config = TrainableTokensConfig(target_modules=["lm_head"], token_indices=rows)
        return get_peft_model(model, config)
    choices = ", ".join(k for k in TRAINABLE_PARTS if k != "full")
    raise UserError(f"trainable_parts {parts!r} is not a Chameleon mode; choose one of {choices} "
                    "(or use_lora: false for a full fine-tune)")
