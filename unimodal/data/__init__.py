"""Pre-tokenised training data: build it once, then pack and collate it for fine-tuning.

- `pretokenize` / `save_pretokenized` / `load_pretokenized`: images encoded once into stored id
  sequences (``recipes/tokenize_dataset.py`` drives them, also sharded over processes).
- `format` (a leaf): the sequence rules, loss masks and `fit_sample` as plain values.
- `packing`: bin packing of lengths into a `RowPlan` (plain values in, a plan out).
- `UnimodalCollator` + `make_dataloader` (`loader`): samples fitted to ``max_length`` without
  cutting an image span, optionally packed, with per-task loss masks and condition dropout for CFG.

See docs/data.md for the sequence format and every option.
"""

from .collator import UnimodalCollator, drops_condition
from .format import DEFAULT_LOSS_ON, IGNORE_INDEX, SequenceFormat, fit_sample, loss_mask
from .loader import LengthGroupedSampler, RowDataset, make_dataloader, plan_dataset
from .packing import RowPlan, pack_lengths, plan_rows
from .pretokenize import TASKS, PretokenizeOptions, PretokenizeResult, PretokenizeStats, load_source, pretokenize
from .storage import (
    PROCESSOR_SUBFOLDER,
    load_pretokenized,
    merge_shards,
    read_metadata,
    save_pretokenized,
    shard_bounds,
)

__all__ = [
    "DEFAULT_LOSS_ON", "IGNORE_INDEX", "PROCESSOR_SUBFOLDER", "TASKS", "LengthGroupedSampler", "PretokenizeOptions",
    "PretokenizeResult", "PretokenizeStats", "RowDataset", "RowPlan", "SequenceFormat",
    "UnimodalCollator", "drops_condition", "fit_sample", "load_pretokenized", "load_source", "loss_mask",
    "make_dataloader", "merge_shards", "pack_lengths", "plan_dataset", "plan_rows", "pretokenize", "read_metadata",
    "save_pretokenized", "shard_bounds",
]
