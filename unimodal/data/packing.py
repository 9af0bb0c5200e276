"""Fitting samples to ``max_length``, loss masks, and grouping samples into rows and batches.

A *row* is one line of a batch: with packing, several whole samples back to back (planned once
by best-fit-decreasing bin packing of their lengths); without, one sample. Image spans are
never cut: a too-long sample loses text (the tail of a caption, or the tail of a document)
or is dropped, and both are counted in the `RowPlan`.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

if TYPE_CHECKING:
    from ..processor import UnimodalProcessor
    from .collator import UnimodalCollator

logger = logging.getLogger(__name__)

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

    @classmethod
    def from_processor(cls, processor: UnimodalProcessor) -> SequenceFormat:
        uncond = tuple(processor.unconditional_prompt_ids())
        if uncond[-1] != processor.boi_token_id:
            raise ValueError(f"the unconditional prompt {list(uncond)} must end in <boi> "
                             f"({processor.boi_token_id}) for condition dropout to splice it in")
        return cls(processor.pad_token_id, processor.boi_token_id, processor.eoi_token_id,
                   tuple(processor.image_token_range), uncond)


def loss_mask(ids: np.ndarray, fmt: SequenceFormat, loss_on: str) -> np.ndarray:
    """BoolArray ``[T]``: which tokens of ONE sample are prediction targets.

    - ``"image"``: the image ids and ``<eoi>`` (what the model emits once given ``<boi>``);
    - ``"text"``: every token that is not an image id, ``<boi>`` or ``<eoi>`` (text and ``<eos>``);
    - ``"all"``: every token.

    The first token is never a target: nothing in its own sample precedes it (in a packed row the
    previous sample's last token must not learn to predict it).
    """
    lo, hi = fmt.image_token_range
    image = (ids >= lo) & (ids < hi)
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

    - t2i (``<bos> caption <boi> image <eoi> <eos>``): the caption loses its last tokens, so the
      image stays whole; dropped when not even a one-token caption fits.
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
        boi = cond_len - 1  # the prompt ends in <boi>; the caption ends right before it
        ids, cond_len = np.concatenate([ids[: boi - excess], ids[boi:]]), cond_len - excess
    else:
        cut = max_length
        opened = np.flatnonzero(ids[:cut] == fmt.boi_token_id)
        if len(opened) and not (ids[opened[-1]:cut] == fmt.eoi_token_id).any():
            cut = int(opened[-1])  # the last span started before the cut but ends after it
        ids = ids[:cut]
    return (ids, cond_len) if loss_mask(ids, fmt, loss_on).any() else None


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: indices of ``lengths`` grouped into bins of total length
    <= ``capacity``. Each item goes into the fullest bin it fits in (a sorted list of the free
    spaces makes that a bisection), so few bins stay part-empty. Deterministic."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    bins: list[list[int]] = []
    free: dict[int, list[int]] = {}  # free space -> bins with exactly that much space left
    spaces: list[int] = []  # sorted keys of `free`
    for i in order.tolist():
        length = int(lengths[i])
        if length > capacity:
            raise ValueError(f"item {i} has length {length} > capacity {capacity}; fit samples first")
        k = bisect.bisect_left(spaces, length)
        if k < len(spaces):
            space = spaces[k]
            b = free[space].pop()
            if not free[space]:
                del free[space]
                spaces.pop(k)
        else:
            b, space = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = space - length
        if left > 0:
            if left not in free:
                bisect.insort(spaces, left)
                free[left] = []
            free[left].append(b)
    return bins


@dataclass
class RowPlan:
    """Rows of sample indices, and what fitting to ``max_length`` did."""

    rows: list[list[int]]
    row_lengths: np.ndarray  # planned tokens per row (before condition dropout shortens t2i)
    num_samples: int  # samples in the data set
    num_truncated: int  # samples that lost text to fit
    num_dropped: int  # samples that could not fit at all
    max_length: int

    @property
    def padding_fraction(self) -> float:
        """Share of pad tokens if every row were padded to ``max_length``."""
        return 1.0 - float(self.row_lengths.sum()) / max(1, len(self.rows) * self.max_length)


def plan_rows(dataset: datasets.Dataset, collator: UnimodalCollator) -> RowPlan:
    """Fit every sample to ``collator.max_length`` and group them into rows (packed or one each).

    Only samples longer than ``max_length`` are read (the ``length`` column plans the rest).
    """
    lengths = np.asarray(dataset.with_format("numpy", columns=["length"])["length"][:], dtype=np.int64)
    keep = np.ones(len(lengths), dtype=bool)
    long = np.flatnonzero(lengths > collator.max_length)
    for i, row in zip(long.tolist(), dataset.select(long) if len(long) else []):
        fitted = fit_sample(np.asarray(row["input_ids"]), row["task"], row["cond_len"],
                            collator.max_length, collator.format, collator.loss_target(row["task"]))
        keep[i] = fitted is not None
        lengths[i] = len(fitted[0]) if fitted is not None else 0
    kept = np.flatnonzero(keep)
    if collator.packing:
        rows = [[int(kept[j]) for j in b] for b in pack_lengths(lengths[kept], collator.max_length)]
    else:
        rows = [[int(i)] for i in kept]
    row_lengths = np.array([lengths[r].sum() for r in rows], dtype=np.int64)
    dropped = int((~keep).sum())
    plan = RowPlan(rows, row_lengths, len(lengths), len(long) - dropped, dropped, collator.max_length)
    if len(long):
        logger.info("max_length %d: %d samples truncated, %d dropped (of %d)", collator.max_length,
                    plan.num_truncated, plan.num_dropped, plan.num_samples)
    return plan


class RowDataset(Dataset):
    """Map-style dataset of planned rows; item ``i`` is the list of its samples, each a dict with
    ``input_ids``, ``task``, ``cond_len`` and ``index`` (the sample's row in ``dataset``)."""

    def __init__(self, dataset: datasets.Dataset, plan: RowPlan):
        self.data = dataset.select_columns(["input_ids", "task", "cond_len"])
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan.rows)

    def __getitem__(self, i: int) -> list[dict]:
        indices = self.plan.rows[i]
        cols = self.data[indices]  # one read for the whole row
        return [{"input_ids": cols["input_ids"][k], "task": cols["task"][k], "cond_len": cols["cond_len"][k],
                 "index": idx} for k, idx in enumerate(indices)]


class LengthGroupedSampler(Sampler[int]):
    """Random order in which each run of ``batch_size`` indices has similar lengths.

    Per epoch: shuffle (seeded by ``(seed, epoch)``), cut into mega-batches of ``batch_size *
    mega_batches``, sort each by length, cut into batches, shuffle the batch order. Padded
    batches then waste little, and the order is a function of ``(seed, epoch)`` so a resumed run
    (``skip_first_batches``) continues it exactly. Only the very last batch can be short.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batches: int = 64):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.mega_batches, self.epoch = batch_size, seed, mega_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        mega = self.batch_size * self.mega_batches
        batches = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        short = [b for b in batches if len(b) < self.batch_size]
        full = [batches[k] for k in rng.permutation(len(batches)) if len(batches[k]) == self.batch_size]
        for batch in full + short:
            yield from batch.tolist()


def make_dataloader(dataset: datasets.Dataset, collator: UnimodalCollator, batch_size: int, *,
                    shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                    drop_last: bool = False) -> DataLoader:
    """A DataLoader of model-ready batches from pre-tokenised samples.

    ``batch_size`` counts rows: with ``collator.packing`` each row holds up to ``max_length``
    tokens of whole samples; without, one sample, and batches are grouped by length
    (`LengthGroupedSampler`). Shuffling is a function of ``(seed, epoch)``: call
    ``loader.set_epoch`` (accelerate-prepared loaders) and ``collator.set_epoch`` each epoch
    (`unimodal.training.infinite_batches` does both). The plan (rows, truncation and drop
    counts) is ``loader.dataset.plan``.
    """
    plan = plan_rows(dataset, collator)
    if not plan.rows:
        raise ValueError(f"no sample fits in max_length={collator.max_length} "
                         f"({plan.num_dropped} dropped); raise max_length")
    rows = RowDataset(dataset, plan)
    if not shuffle:
        sampler: Sampler = SequentialSampler(rows)
    elif collator.packing:
        # A plain RandomSampler: accelerate swaps it for its seedable one (seed, epoch).
        sampler = RandomSampler(rows, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = LengthGroupedSampler(plan.row_lengths, batch_size, seed)
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      num_workers=num_workers, drop_last=drop_last)
