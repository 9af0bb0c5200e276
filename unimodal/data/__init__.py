"""Pre-tokenised training data: build it once, then pack and collate it for fine-tuning.

- `pretokenize` / `save_pretokenized` / `load_pretokenized`: images encoded once into stored id
  sequences (``recipes/tokenize_dataset.py`` drives them, also sharded over processes).
- `UnimodalCollator` + `make_dataloader`: samples fitted to ``max_length`` without cutting an
  image span, optionally packed, with per-task loss masks and condition dropout for CFG.

See docs/data.md for the sequence format and every option.
"""

from .collator import IGNORE_INDEX, UnimodalCollator, drops_condition
from .packing import (
    DEFAULT_LOSS_ON,
    LengthGroupedSampler,
    RowDataset,
    RowPlan,
    SequenceFormat,
    fit_sample,
    loss_mask,
    make_dataloader,
    pack_lengths,
    plan_rows,
)
from .pretokenize import TASKS, PretokenizeOptions, PretokenizeResult, PretokenizeStats, load_source, pretokenize
from .storage import load_pretokenized, merge_shards, read_metadata, save_pretokenized, shard_bounds

__all__ = [
    "DEFAULT_LOSS_ON", "IGNORE_INDEX", "TASKS", "LengthGroupedSampler", "PretokenizeOptions",
    "PretokenizeResult", "PretokenizeStats", "RowDataset", "RowPlan", "SequenceFormat",
    "UnimodalCollator", "drops_condition", "fit_sample", "load_pretokenized", "load_source", "loss_mask",
    "make_dataloader", "merge_shards", "pack_lengths", "plan_rows", "pretokenize", "read_metadata",
    "save_pretokenized", "shard_bounds",
]
