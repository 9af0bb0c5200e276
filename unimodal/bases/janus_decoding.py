"""Image-token decoders for `JanusImageLM`: `KVDecoder`'s interface (prefill / step / extend /
crop) with the logits of Janus's generation head ``[B, K]`` instead of a slice of the LM head.

The fed ids are ours (text ids, then image ids ``V + code``), so `JanusImageLM.embed_ids` sends the
image codes through the generation embedding + aligner exactly as Janus's own
``generate(generation_mode="image")`` does; the batched CFG, per-row seeds and the span of
`unimodal.generation.images.sample_image_tokens` then apply unchanged. Speculative Jacobi decoding
only uses extend / crop, and the static-cache / compiled variant calls the model through
`StaticKVDecoder._call`, so all of the recipes' decoding options work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..extend import unwrap_peft
from ..generation.decoder import KVDecoder
from ..generation.static import StaticKVDecoder
from .janus_model import JanusImageLM


class _GenerationHeadLogits:
    """Mixin: one model call returning the generation head's logits (``image_logits=True``)."""

    attention_mask: torch.Tensor | None
    cache: Any
    _call: Any  # KVDecoder's model call (compiled by StaticKVDecoder); the mixin comes first in the MRO

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """``[B, n]`` ids -> logits of the last ``keep`` positions over the K codes ``[B, keep, K]``."""
        kwargs = dict(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                      cache=self.cache, use_cache=True, logits_to_keep=keep, image_logits=True)
        out = self._call(kwargs)
        self.cache = out.cache
        return out.logits[:, -keep:].float()


class JanusImageDecoder(_GenerationHeadLogits, KVDecoder):
    """Dynamic-cache decoder over `JanusImageLM` (or a PEFT model around one)."""

    def __init__(self, model: nn.Module, vocab_slice: tuple[int, int]):
        super().__init__(model, vocab_slice=None)  # no LM-head slice: the generation head is separate
        self.vocab_slice = vocab_slice  # [V, V + K): what the logits' columns stand for


class JanusStaticImageDecoder(_GenerationHeadLogits, StaticKVDecoder):
    """Static-cache (optionally compiled) decoder over `JanusImageLM`."""

    def __init__(self, model: nn.Module, vocab_slice: tuple[int, int], max_length: int,
                 compile: bool | str = False, stats: Any = None):
        super().__init__(model, None, max_length, compile, stats)
        self.vocab_slice = vocab_slice


def janus_image_decoder(model: nn.Module, vocab_slice: tuple[int, int], max_length: int, static_cache: bool,
                        compile: bool | str, stats: Any) -> KVDecoder:
    """The decoder `JanusProcessor.image_decoder` returns; refuses a model that is not a
    `JanusImageLM` (load it with the janus base's ``load_model``)."""
    if not isinstance(unwrap_peft(model), JanusImageLM):
        raise TypeError(f"Janus image generation needs a JanusImageLM (unimodal.bases.janus.load_model), "
                        f"got {type(unwrap_peft(model)).__name__}")
    if static_cache or compile:
        return JanusStaticImageDecoder(model, vocab_slice, max_length, compile, stats)
    return JanusImageDecoder(model, vocab_slice)
