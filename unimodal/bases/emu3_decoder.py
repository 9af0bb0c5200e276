"""Emu3's image decoding for `sample_image_tokens`: ``h x w`` sampled codes, end-of-lines fed here.

Emu3 writes an image row by row, each row of ``w`` visual ids followed by ``<|extra_200|>``. Only
the visual ids are sampled; the end-of-line is forced (Emu3's own ``generate`` needs a
``prefix_allowed_tokens_fn`` that allows nothing else there). So the decoder feeds it itself: after
the ``w``-th code of a row the step feeds ``[code, <|extra_200|>]`` in one forward pass and returns
the logits after the end-of-line. `sample_image_tokens` then sees a plain ``h*w`` span: ``[B, K]``
logits of the visual ids (slice order) per step, cond and uncond rows alike (both get the
end-of-line, as both get every sampled code).

Speculative (Jacobi) decoding is refused: its drafts would have to skip the forced ids; the
static cache and ``compile`` work (the cache gets ``h`` more positions, and the two-token steps
run through the dynamic-shape compiled call).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..generation.decoder import KVDecoder
from ..generation.static import StaticKVDecoder

JACOBI_REFUSED = ("Emu3 image generation does not support decoding='jacobi' (its end-of-line tokens are "
                  "forced between drafted rows); use decoding='token'")


class _EndOfLineRows:
    """Mixin over `KVDecoder` / `StaticKVDecoder`: feeds ``eol_id`` after every ``width`` steps."""

    width: int
    eol_id: int
    fed: int

    def _setup(self, width: int, eol_id: int) -> None:
        self.width, self.eol_id, self.fed = width, eol_id, 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.fed = 0  # codes fed since the prompt
        return super().prefill(input_ids, attention_mask)  # type: ignore[misc]

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one code id per row ``[R]``; at a row's end also ``<|extra_200|>``: logits ``[R, K]``."""
        self.fed += 1
        ids = next_ids.view(-1, 1)
        if self.fed % self.width == 0:  # the row is complete: its end-of-line goes in the same pass
            ids = torch.cat([ids, torch.full_like(ids, self.eol_id)], 1)  # [R, 2]
        return super().extend(ids)[:, -1]  # type: ignore[misc]

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        raise ValueError(JACOBI_REFUSED)

    def prefill_extend(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        raise ValueError(JACOBI_REFUSED)

    def crop(self, n: int) -> None:
        raise ValueError(JACOBI_REFUSED)


class Emu3ImageDecoder(_EndOfLineRows, KVDecoder):
    """`KVDecoder` (dynamic cache) for Emu3 image spans."""

    def __init__(self, model: nn.Module, vocab_slice: tuple[int, int], width: int, eol_id: int):
        super().__init__(model, vocab_slice)
        self._setup(width, eol_id)


class Emu3StaticImageDecoder(_EndOfLineRows, StaticKVDecoder):
    """`StaticKVDecoder` for Emu3 image spans (``max_length`` must count the end-of-lines)."""

    def __init__(self, model: nn.Module, vocab_slice: tuple[int, int], max_length: int, width: int, eol_id: int,
                 compile: bool | str = False, stats: Any = None):
        super().__init__(model, vocab_slice, max_length, compile, stats)
        self._setup(width, eol_id)


def emu3_image_decoder(model: nn.Module, processor, vocab_slice: tuple[int, int], max_length: int,
                       static_cache: bool, compile: bool | str, stats: Any = None) -> KVDecoder:
    """The decoder for ``processor`` (an `Emu3Processor`); ``max_length`` as `sample_image_tokens`
    sizes it for a plain span (the ``h`` end-of-lines are added here)."""
    h, w = processor.grid_shape
    if static_cache or compile:
        return Emu3StaticImageDecoder(model, vocab_slice, max_length + h, w, processor.eol_token_id, compile, stats)
    return Emu3ImageDecoder(model, vocab_slice, w, processor.eol_token_id)
