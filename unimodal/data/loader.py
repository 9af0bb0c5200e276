"""The DataLoader factory: pre-tokenised samples fitted to ``max_length``, planned into rows
(`unimodal.data.packing`), ordered by a seedable sampler and collated by `UnimodalCollator`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from .collator import UnimodalCollator
from .format import fit_sample
from .packing import RowPlan, plan_rows

logger = logging.getLogger(__name__)


def plan_dataset(dataset: datasets.Dataset, collator: UnimodalCollator) -> RowPlan:
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
    dropped = np.flatnonzero(~keep)
    plan = plan_rows(lengths, collator.max_length, packing=collator.packing, dropped=dropped,
                     num_truncated=len(long) - len(dropped))
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

    def __init__(self, lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int = 0, mega_batches: int = 64):
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
    plan = plan_dataset(dataset, collator)
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
