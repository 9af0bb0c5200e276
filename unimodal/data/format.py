"""The sequence format's rules as plain values: which ids a sample holds, which are loss targets,
and how a too-long sample is fitted to ``max_length`` without cutting an image span.

A leaf module (numpy only): the collator, the loader and pre-tokenisation build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # label value the transformers loss skips
LOSS_TARGETS = ("image", "text", "all")
# What each task learns by default: generate the image from the caption, the caption from the
# image, and everything of an interleaved document.
DEFAULT_LOSS_ON = {"t2i": "image", "i2t": "text", "interleaved": "all"}


@dataclass(frozen=True)
class SequenceFormat:
    """The ids the collator needs (plain ints: cheap to copy into data-loader workers)."""

    pad_token_id: int
    boi_token_id: int
    eoi_token_id: int
    image_token_range: tuple[int, int]  # [first, last + 1)
    unconditional: tuple[int, ...]  # <bos> <boi>: the t2i prompt of an empty caption
    # Unified bases (unimodal.bases) whose prompt has a template between caption and <boi>
    # (Janus's "\n\n<|Assistant|>:", Emu3's size header): that many ids right before <boi>.
    caption_suffix_len: int = 0
    # Control ids inside an image span besides the image ids (Emu3's row separators, its span
    # start/end): targets of "image", not of "text".
    span_ids: tuple[int, ...] = ()

    @classmethod
    def from_processor(cls, processor: Any) -> SequenceFormat:
        """From a `unimodal.UnimodalProcessor` (typed ``Any``: this module is a leaf); a processor
        may add ``caption_suffix_len`` and ``span_control_ids`` (see the fields)."""
        uncond = tuple(processor.unconditional_prompt_ids())
        if uncond[-1] != processor.boi_token_id:
            raise ValueError(f"the unconditional prompt {list(uncond)} must end in <boi> "
                             f"({processor.boi_token_id}) for condition dropout to splice it in")
        return cls(processor.pad_token_id, processor.boi_token_id, processor.eoi_token_id,
                   tuple(processor.image_token_range), uncond,
                   int(getattr(processor, "caption_suffix_len", 0)),
                   tuple(int(i) for i in getattr(processor, "span_control_ids", ())))


def loss_mask(ids: np.ndarray, fmt: SequenceFormat, loss_on: str) -> np.ndarray:
    """BoolArray ``[T]``: which tokens of ONE sample are prediction targets.

    - ``"image"``: the image ids, the span's control ids (``fmt.span_ids``) and ``<eoi>`` (what
      the model emits once given ``<boi>``);
    - ``"text"``: every token that is not an image id, ``<boi>``, ``<eoi>`` or a span control id
      (text and ``<eos>``);
    - ``"all"``: every token.

    The first token is never a target: nothing in its own sample precedes it (in a packed row the
    previous sample's last token must not learn to predict it).
    """
    lo, hi = fmt.image_token_range
    image = (ids >= lo) & (ids < hi)
    if fmt.span_ids:
        image |= np.isin(ids, fmt.span_ids)
    if loss_on == "image":
        mask = image | (ids == fmt.eoi_token_id)
    elif loss_on == "text":
        mask = ~(image | (ids == fmt.boi_token_id) | (ids == fmt.eoi_token_id))
    elif loss_on == "all":
        mask = np.ones(len(ids), dtype=bool)
    else:
        raise ValueError(f"loss_on must be one of {LOSS_TARGETS}, got {loss_on!r}")
    mask[:1] = False
    return mask


def fit_sample(ids: np.ndarray, task: str, cond_len: int, max_length: int, fmt: SequenceFormat,
               loss_on: str) -> tuple[np.ndarray, int] | None:
    """Make one sample fit in ``max_length`` tokens without cutting an image span.

    - t2i (``<bos> caption <boi> image <eoi> <eos>``): the caption loses its last tokens (those
      before ``fmt.caption_suffix_len`` template ids, if any), so the image stays whole; dropped
      when not even a one-token caption fits.
    - i2t / interleaved: the tail is cut; a cut that would land inside an image span moves to
      just before that span's ``<boi>``.

    Returns ``(ids, cond_len)``, unchanged when the sample fits, or None (drop it) when nothing
    is left to learn from: no target token under ``loss_on`` survives the cut.
    """
    if len(ids) <= max_length:
        return ids, cond_len
    if task == "t2i" and cond_len:
        excess = len(ids) - max_length
        caption_len = cond_len - len(fmt.unconditional)
        if excess >= caption_len:
            return None
        # the prompt ends in <boi>; the caption ends right before it (or before the template suffix)
        end = cond_len - 1 - fmt.caption_suffix_len
        ids, cond_len = np.concatenate([ids[: end - excess], ids[end:]]), cond_len - excess
    else:
        cut = max_length
        opened = np.flatnonzero(ids[:cut] == fmt.boi_token_id)
        if len(opened) and not (ids[opened[-1]:cut] == fmt.eoi_token_id).any():
            cut = int(opened[-1])  # the last span started before the cut but ends after it
        ids = ids[:cut]
    return (ids, cond_len) if loss_mask(ids, fmt, loss_on).any() else None
