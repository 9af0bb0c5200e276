"""Grouping samples into rows: best-fit-decreasing bin packing of their lengths.

Pure: plain lengths in, a `RowPlan` out (the loader reads the data set and fits the samples).
A *row* is one line of a batch: with packing, several whole samples back to back; without, one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def pack_lengths(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
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


def plan_rows(lengths: Sequence[int] | np.ndarray, max_length: int, *, packing: bool,
              dropped: Sequence[int] | np.ndarray = (), num_truncated: int = 0) -> RowPlan:
    """Rows of sample indices for samples of (already fitted) ``lengths``.

    ``dropped`` are indices of samples that could not fit and get no row; ``num_truncated``
    counts the samples that lost text to fit (both are reported in the plan).
    """
    lens = np.asarray(lengths, dtype=np.int64)
    keep = np.ones(len(lens), dtype=bool)
    keep[np.asarray(dropped, dtype=np.int64)] = False
    kept = np.flatnonzero(keep)
    if packing:
        rows = [[int(kept[j]) for j in b] for b in pack_lengths(lens[kept], max_length)]
    else:
        rows = [[int(i)] for i in kept]
    row_lengths = np.array([lens[r].sum() for r in rows], dtype=np.int64)
    return RowPlan(rows, row_lengths, len(lens), num_truncated, len(keep) - len(kept), max_length)
