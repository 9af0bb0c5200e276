"""`UnimodalCollator`: rows of pre-tokenised samples -> model-ready tensors.

Packed rows need care: transformers (5.x, ``masking_utils``) builds a block-diagonal causal
mask from ``position_ids`` that restart at 0 for each sample ONLY when ``attention_mask`` is None
and no KV cache is in use. So a packed batch has no ``attention_mask``, carries position ids
that reset per sample, and ``use_cache=False`` (most configs default to ``use_cache=True``, and
a cache silently lets packed samples attend to each other). ``model(**batch)`` is then exact:
every sample's logits equal those of the sample run alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .format import DEFAULT_LOSS_ON, IGNORE_INDEX, LOSS_TARGETS, SequenceFormat, fit_sample, loss_mask

if TYPE_CHECKING:  # a type only: the processor module never imports the data package
    from ..processor import UnimodalProcessor


def drops_condition(seed: int, epoch: int, index: int, probability: float) -> bool:
    """Whether sample ``index`` loses its caption in ``epoch``: a hash of ``(seed, epoch,
    index)``, the same in every process, worker and resumed run."""
    if probability <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < probability


class UnimodalCollator:
    """Turn rows of samples (from `make_dataloader`) into a batch for ``model(**batch)``.

    Args:
        processor: gives the control ids and the unconditional prompt.
        max_length: longest row (packing) or sample (padded) in tokens; longer samples are
            fitted by `fit_sample` (text truncated, image spans kept whole) or dropped.
        packing: several samples per row, each attending only to itself (see module docstring).
            Otherwise one sample per row, right-padded, with an ``attention_mask``.
        loss_on: ``"image"``, ``"text"`` or ``"all"`` for every task, a ``{task: target}``
            mapping, or ``"auto"``: t2i learns the image, i2t the caption, interleaved all.
        cfg_dropout: probability that a t2i sample's prompt ``<bos> caption <boi>`` is replaced
            by ``processor.unconditional_prompt_ids()`` (the exact prompt the unconditional
            branch of classifier-free guidance uses), decided by `drops_condition`.
        seed: seed of the dropout decisions; call `set_epoch` every epoch.
        pad_to_multiple_of: round the batch length up (e.g. 8 for tensor cores).

    Batch keys: ``input_ids`` and ``labels`` ``[B, T]`` (``-100`` = no loss), ``position_ids``
    ``[B, T]`` (packing) or ``attention_mask`` ``[B, T]`` (padded), and ``use_cache=False``.
    """

    def __init__(
        self,
        processor: UnimodalProcessor,
        max_length: int,
        *,
        packing: bool = False,
        loss_on: str | Mapping[str, str] = "auto",
        cfg_dropout: float = 0.0,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if not 0 <= cfg_dropout <= 1:
            raise ValueError(f"cfg_dropout must be a probability in [0, 1], got {cfg_dropout}")
        self.format = SequenceFormat.from_processor(processor)
        self.max_length, self.packing, self.cfg_dropout, self.seed = max_length, packing, cfg_dropout, seed
        self.pad_to_multiple_of = pad_to_multiple_of
        if loss_on == "auto":
            loss_on = DEFAULT_LOSS_ON
        self.loss_on = dict(loss_on) if isinstance(loss_on, Mapping) else {t: loss_on for t in DEFAULT_LOSS_ON}
        bad = {t: v for t, v in self.loss_on.items() if v not in LOSS_TARGETS}
        if bad:
            raise ValueError(f"loss_on values must be in {LOSS_TARGETS}, got {bad}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the condition-dropout draws of ``epoch``."""
        self.epoch = epoch

    def loss_target(self, task: str) -> str:
        if task not in self.loss_on:
            raise ValueError(f"no loss target for task {task!r}; pass loss_on with a {task!r} entry")
        return self.loss_on[task]

    def sample(self, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids [T], labels [T])`` of one stored sample after fitting and condition dropout,
        or None when it cannot fit in ``max_length``."""
        task, target = item["task"], self.loss_target(item["task"])
        fitted = fit_sample(np.asarray(item["input_ids"], dtype=np.int64), task, int(item["cond_len"]),
                            self.max_length, self.format, target)
        if fitted is None:
            return None
        ids, cond_len = fitted
        if task == "t2i" and cond_len and self.cfg_dropout > 0:
            if "index" not in item:
                raise ValueError("condition dropout needs each sample's 'index'; build the loader "
                                 "with unimodal.data.make_dataloader")
            if drops_condition(self.seed, self.epoch, int(item["index"]), self.cfg_dropout):
                ids = np.concatenate([np.asarray(self.format.unconditional, dtype=np.int64), ids[cond_len:]])
        labels = np.where(loss_mask(ids, self.format, target), ids, IGNORE_INDEX)
        return ids, labels

    def __call__(self, rows: Sequence[Sequence[Mapping[str, Any]] | Mapping[str, Any]]) -> dict[str, Any]:
        # A row is a list of samples (make_dataloader) or one sample dict (a plain data set).
        grouped: list[Sequence[Mapping[str, Any]]] = [[r] if isinstance(r, Mapping) else r for r in rows]
        if not self.packing and any(len(row) > 1 for row in grouped):
            raise ValueError("rows of several samples need packing=True (else they would attend to each other)")
        built = [[s for s in map(self.sample, row) if s is not None] for row in grouped]
        # A row whose samples were all dropped (only possible without make_dataloader's plan) would
        # be fully masked, which gives NaN attention: leave it out of the batch.
        built = [row for row in built if row]
        if not built:
            raise ValueError(f"no sample of this batch fits in max_length={self.max_length}")
        lengths = [sum(len(ids) for ids, _ in row) for row in built]
        if max(lengths) > self.max_length:
            raise ValueError(f"a row holds {max(lengths)} tokens > max_length={self.max_length}; "
                             "plan rows with unimodal.data.make_dataloader")
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(built), width), self.format.pad_token_id, dtype=torch.long)
        labels = torch.full((len(built), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(built), width), dtype=torch.long)
        for r, row in enumerate(built):
            start = 0
            # Samples back to back; positions restart at 0 for each one and for the padding
            # tail, so the mask code sees a new sequence at every restart.
            for ids, lab in row:
                input_ids[r, start : start + len(ids)] = torch.from_numpy(ids)
                labels[r, start : start + len(ids)] = torch.from_numpy(lab)
                positions[r, start : start + len(ids)] = torch.arange(len(ids))
                start += len(ids)
            positions[r, start:] = torch.arange(width - start)
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        if self.packing:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        # Training never reads a KV cache; building one costs memory and, when packed, breaks the
        # per-sample mask (see module docstring).
        batch["use_cache"] = False
        return batch
