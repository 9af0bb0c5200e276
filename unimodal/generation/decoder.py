"""Incremental forward passes of a Hugging Face causal LM over a left-padded batch with a KV cache.

Left padding needs two things transformers' default model call does not do for us: position ids
that skip the pads (the default counts them) and a 2-D attention mask that grows by one column per
step. In transformers 5.x the cache goes in as ``cache=`` and comes back as ``outputs.cache``.

`KVDecoder` can also compute logits for a slice of the vocabulary only (the image ids inside an
image span): it swaps the LM head for a view of its rows during the call, so any elementwise
post-processing the model does (e.g. Gemma's logit soft-capping) still applies.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn


class _RowSlicedHead(nn.Module):
    """``head`` restricted to output rows ``lo:hi`` (a view of its weight, nothing copied)."""

    def __init__(self, head: nn.Linear, lo: int, hi: int):
        super().__init__()
        self.head, self.lo, self.hi = head, lo, hi

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight
        bias = None if self.head.bias is None else self.head.bias[self.lo:self.hi]
        # .to(): under a device map the last layer and the head can sit on different devices.
        return F.linear(hidden.to(weight.device), weight[self.lo:self.hi], bias)


class KVDecoder:
    """Feeds ``[B, L]`` left-padded prompts, then one token per row per step, keeping the cache.

    Args:
        model: any ``*ForCausalLM`` (eval mode; called under ``torch.no_grad`` by the user).
        vocab_slice: ``(lo, hi)`` to return logits of ids ``lo:hi`` only (``[B, hi - lo]``);
            ``None`` returns the whole vocabulary.
    """

    def __init__(self, model: nn.Module, vocab_slice: tuple[int, int] | None = None):
        # a transformers causal LM or a PEFT wrapper forwarding to one: duck-typed
        self.model: Any = cast(Any, model)
        self.vocab_slice = vocab_slice
        head = self.model.get_output_embeddings()
        # A wrapped head (e.g. PEFT trainable tokens) cannot be sliced: compute all, then slice.
        self._sliced = (
            _RowSlicedHead(head, *vocab_slice)
            if vocab_slice is not None and type(head) is nn.Linear
            else None
        )
        self.cache: Any = None  # DynamicCache or StaticCache once prefilled
        self.attention_mask: torch.Tensor | None = None  # [B, past + new]: a view of _mask
        self._mask: torch.Tensor | None = None  # [B, capacity]: the prompt's mask, then ones
        self.positions: torch.Tensor | None = None  # [B, 1] position of the last fed token

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts; returns next-token logits ``[B, V']`` (float32)."""
        return self._prefill(input_ids, attention_mask, 1)[:, -1]

    def prefill_extend(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        """`prefill` whose last ``n`` ids are treated as `extend` treats its ids: the logits after
        each of them ``[B, n, V']``. One pass for a prompt and the first speculative window
        (what `JacobiDecoding` verifies its first drafts with)."""
        return self._prefill(input_ids, attention_mask, n)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device, torch.long)
        if not (mask[:, -1] == 1).all():
            raise ValueError("prompts must be left-padded (the last column of attention_mask all ones)")
        self.cache = self._new_cache(mask)
        self.attention_mask, self._mask = self._prompt_mask(mask), None
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # pads get 0, masked anyway
        self.positions = positions[:, -1:]
        return self._forward(input_ids, positions, keep)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one id per row ``[B]``; returns the following logits ``[B, V']``."""
        return self.extend(next_ids.view(-1, 1))[:, -1]

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``n`` ids per row ``[B, n]`` in one pass; returns the logits after each ``[B, n, V']``
        (what speculative decoding verifies drafts with)."""
        if self.cache is None or self.attention_mask is None or self.positions is None:
            raise RuntimeError("call prefill() before step() or extend()")
        n = ids.shape[1]
        self._resize_mask(n)
        positions = self.positions + torch.arange(1, n + 1, device=self.positions.device)  # [B, n]
        self.positions = positions[:, -1:]
        return self._forward(ids.to(self.device), positions, n)

    def crop(self, n: int) -> None:
        """Forget the last ``n`` fed ids of every row (rejected drafts)."""
        if n <= 0:
            return
        assert self.positions is not None and self.cache is not None, "crop() before prefill()"
        self.cache.crop(-n)
        self._resize_mask(-n)
        self.positions = self.positions - n

    # What a static cache changes (see static.py): the cache object and the mask's shape.
    def _new_cache(self, mask: torch.Tensor) -> Any:
        """The cache for prompts with ``mask [B, L]``; ``None``: the model makes a DynamicCache."""
        return None

    def _prompt_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The 2-D attention mask of the prefill."""
        return mask

    def _resize_mask(self, n: int) -> None:
        """Grow the mask by ``n`` columns of ones (``n < 0``: drop ``-n``). The columns come from a
        buffer of ones that doubles when full, not a ``torch.cat`` of the whole mask per step."""
        assert self.attention_mask is not None
        length = self.attention_mask.shape[1] + n
        if self._mask is None or length > self._mask.shape[1]:
            grown = self.attention_mask.new_ones(len(self.attention_mask), max(2 * length, 64))
            grown[:, :self.attention_mask.shape[1]] = self.attention_mask
            self._mask = grown
        self.attention_mask = self._mask[:, :length]

    def _call(self, kwargs: dict) -> Any:
        """The model call (a static cache's decoder compiles it)."""
        return self.model(**kwargs)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """One model call; logits of the last ``keep`` positions: ``[B, keep, V']`` (float32)."""
        kwargs = dict(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                      cache=self.cache, use_cache=True, logits_to_keep=keep)
        if self._sliced is None:
            out = self._call(kwargs)
        else:
            full = self.model.get_output_embeddings()
            self.model.set_output_embeddings(self._sliced)
            try:
                out = self._call(kwargs)
            finally:
                self.model.set_output_embeddings(full)
        self.cache = out.cache
        logits = out.logits[:, -keep:]
        if self.vocab_slice is not None and self._sliced is None:
            logits = logits[..., self.vocab_slice[0]:self.vocab_slice[1]]
        return logits.float()
