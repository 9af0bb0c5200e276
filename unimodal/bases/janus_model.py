"""Janus / Janus-Pro as a causal LM over one id space: text ids ``[0, V)`` and image codes as
virtual ids ``[V, V + K)``.

`JanusForConditionalGeneration` generates images through a path of its own: an image code ``c``
enters the language model as ``generation_aligner(generation_embeddings(c))`` (not a row of the
text embedding) and the next code is read from ``generation_head(hidden)`` over the ``K`` VQ codes
(not from ``lm_head``). Nothing is added to its vocabulary: `JanusImageLM` routes ids ``>= V``
(``V`` = rows of the text embedding) through that path, so our id pipeline (pre-tokenisation,
packing, the collator, CFG sampling) carries Janus sequences unchanged.

`JanusImageLM` subclasses `JanusForConditionalGeneration` and adds no parameter: it loads and saves
the checkpoint as it is (same state-dict keys; `save_janus` writes ``architectures`` =
``JanusForConditionalGeneration``), and its own `generate(generation_mode="image")` still works.

Loss (``labels=``): per position, a text target is scored by ``lm_head`` (softmax over ``V``), an
image target by ``generation_head`` (softmax over ``K``): the two heads Janus trains, each with its
own softmax. It is computed here, on the target positions only, ``chunk_size`` rows at a time under
activation checkpointing (one chunk's logits live at a time). The recipes' chunked loss
(`unimodal.training.loss`) cannot do this (it swaps one head), so the class says
``computes_own_loss = True`` and the recipes call ``model(**batch).loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import JanusForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # logits per chunk (fp32: 256 MB): ~650 rows at Janus-Pro's V = 102400


@dataclass
class JanusImageLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the per-row loss terms of a call with ``labels``.

    ``logits``: ``[B, T', V + K]`` = ``[lm_head | generation_head]`` without labels, the
    generation head's ``[B, T', K]`` with ``image_logits=True``, an empty ``[B, T, 0]`` with labels.
    ``loss_sum``: ``[B]`` fp32 sum of token losses (detached); ``num_tokens``: ``[B]`` targets.
    """

    loss_sum: Tensor | None = None
    num_tokens: Tensor | None = None


def _chunk_ce(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """``[n, H]`` hidden, ``[n]`` targets -> ``[n]`` fp32 token losses (the only ``[n, V]`` logits)."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def head_losses(head: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """Token losses ``[N]`` of ``hidden [N, H]`` against ``targets [N]`` through ``head``, computed
    ``chunk_size`` rows at a time; with grad each chunk is checkpointed (backward recomputes its
    logits), so at most one ``[chunk_size, vocab]`` block of logits is alive."""
    if len(hidden) == 0:  # still call the head: every rank of a sharded run runs the same modules
        return _chunk_ce(head, hidden, targets)
    parts = []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_ce, head, h, t, use_reentrant=False))
        else:
            parts.append(_chunk_ce(head, h, t))
    return torch.cat(parts)


class JanusImageLM(JanusForConditionalGeneration):
    """`JanusForConditionalGeneration` whose ``forward`` takes image codes as ids ``V + code``.

    The causal-LM surface the recipes use: ``forward(input_ids, attention_mask, position_ids,
    labels, cache, use_cache, logits_to_keep)`` -> ``.logits`` / ``.loss`` / ``.cache``;
    ``get_input_embeddings()`` is the text embedding (``V`` rows), ``get_output_embeddings()`` the
    text ``lm_head``; gradient checkpointing as for the parent. The understanding path
    (``pixel_values``, SigLIP features) is not used.
    """

    computes_own_loss = True  # the recipes call model(**batch).loss (see the module docstring)

    @property
    def text_vocab_size(self) -> int:
        """``V``: rows of the text embedding; image code ``c`` is id ``V + c``."""
        return int(cast(nn.Embedding, self.get_input_embeddings()).num_embeddings)

    @property
    def num_image_codes(self) -> int:
        """``K``: codes of the VQ model (rows of the generation embedding)."""
        return int(cast(nn.Embedding, self.model.generation_embeddings).num_embeddings)

    def embed_ids(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` ids -> ``[B, T, H]``: text ids through the text embedding, ids ``>= V``
        through the generation embedding and aligner (what Janus's generate feeds)."""
        v = self.text_vocab_size
        is_image = input_ids >= v  # [B, T]
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, T, H]
        # The image rows only ([N, H]); N = 0 still runs the modules (same calls on every rank).
        image = self.prepare_embeddings_for_image_generation(input_ids[is_image] - v)
        return embeds.masked_scatter(is_image.unsqueeze(-1), image.to(embeds.dtype))

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache=None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        num_items_in_batch: Tensor | int | None = None,
        image_logits: bool = False,
        chunk_size: int | None = None,
        **kwargs,
    ) -> JanusImageLMOutput:
        """See the class docstring. ``image_logits``: return only the generation head's logits
        ``[B, T', K]`` (what image sampling reads). ``chunk_size``: target rows per head call of
        the loss (default ``CHUNK_ELEMENTS // V``). ``num_items_in_batch``: divide the summed loss by
        it (gradient accumulation) instead of taking the mean over target tokens."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_ids(input_ids)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state  # [B, T, H], after the final norm
        if labels is not None:
            loss, sums, counts = self._loss(hidden, labels, chunk_size, num_items_in_batch)
            return JanusImageLMOutput(loss=loss, logits=hidden.new_zeros(*hidden.shape[:2], 0), cache=out.cache,
                                      loss_sum=sums, num_tokens=counts)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        if image_logits:
            logits = self.model.generation_head(hidden)  # [B, T', K]
        else:
            logits = torch.cat([self.lm_head(hidden), self.model.generation_head(hidden)], -1)  # [B, T', V + K]
        return JanusImageLMOutput(logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                  attentions=out.attentions)

    def _loss(self, hidden: Tensor, labels: Tensor, chunk_size: int | None,
              num_items_in_batch: Tensor | int | None) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, per-row loss sums [B], per-row target counts [B]) of unshifted ``labels [B, T]``."""
        v = self.text_vocab_size
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(hidden.device)  # [B, T]: t predicts t + 1
        valid = targets != IGNORE_INDEX
        image, text = valid & (targets >= v), valid & (targets < v)
        token_losses = hidden.new_zeros(targets.shape, dtype=torch.float32)  # [B, T]
        for mask, head, offset, vocab in ((text, self.lm_head, 0, v),
                                          (image, self.model.generation_head, v, self.num_image_codes)):
            rows = chunk_size or max(1, CHUNK_ELEMENTS // vocab)
            losses = head_losses(head, hidden[mask], targets[mask] - offset, rows)  # [N]
            token_losses = token_losses.masked_scatter(mask, losses)
        total = token_losses.sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        counts = valid.sum(1)
        loss = total / (counts.sum() if num_items_in_batch is None else num_items_in_batch)
        return loss, token_losses.detach().sum(1), counts
