"""The fine-tuning data: pre-tokenised samples checked against the processor, mixed by task, with a
held-out split per task."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np

from ..data import PROCESSOR_SUBFOLDER, load_pretokenized, read_metadata
from ..errors import MissingInputError
from ..processor import UnimodalProcessor
from .args import DataArguments


def load_data_processor(dataset_path: str | os.PathLike) -> UnimodalProcessor:
    """The processor pre-tokenised data was written with (its ``processor/`` subfolder)."""
    if not (Path(dataset_path) / PROCESSOR_SUBFOLDER).is_dir():
        raise MissingInputError(f"dataset_path {str(dataset_path)!r} is not pre-tokenised data: write it with "
                                "`unimodal tokenize-dataset` (recipes/tokenize_dataset.py in a clone)")
    return UnimodalProcessor.from_pretrained(Path(dataset_path) / PROCESSOR_SUBFOLDER)


def load_task_data(
    args: DataArguments, processor: UnimodalProcessor, seed: int = 0
) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """``(train samples mixed by task, {task: held-out samples})``.

    Raises a ``ValueError`` for data tokenised with another processor, an empty data set, a task
    without samples, or weights that do not match the tasks.
    """
    stats = read_metadata(args.dataset_path)["stats"]
    if stats["num_samples"] == 0:  # (datasets cannot even load an empty Arrow/parquet folder)
        raise ValueError(f"{args.dataset_path} holds no samples: {stats['num_skipped']} of {stats['num_examples']} "
                         f"source rows were skipped ({stats['skipped'][:3]}); fix the source data and re-run "
                         "`unimodal tokenize-dataset` (recipes/tokenize_dataset.py in a clone)")
    data = load_pretokenized(args.dataset_path, processor)
    weights = args.task_weights or [1.0] * len(args.tasks)
    if len(weights) != len(args.tasks) or min(weights) <= 0:
        raise ValueError(f"task_weights {weights} must be one positive number per task {args.tasks}")
    held_out = load_pretokenized(args.eval_dataset_path, processor) if args.eval_dataset_path else None
    tasks = np.asarray(data["task"])
    rng = np.random.default_rng(seed)
    train_parts, evals = [], {}
    for task, weight in zip(args.tasks, weights):
        rows = np.flatnonzero(tasks == task)
        if len(rows) == 0:
            found = sorted(set(tasks.tolist()))
            raise ValueError(f"task {task!r} has no samples in {args.dataset_path} (it has {found}); "
                             "remove it from tasks or re-run tokenize_dataset with it")
        rows = rng.permutation(rows)
        if held_out is None:
            if len(rows) <= args.eval_size:
                raise ValueError(f"task {task!r} has {len(rows)} samples, not enough to hold out "
                                 f"eval_size={args.eval_size}; lower eval_size or pass eval_dataset_path")
            evals[task], rows = data.select(np.sort(rows[: args.eval_size])), rows[args.eval_size :]
        else:
            evals[task] = held_out.filter(lambda t, task=task: t == task, input_columns="task")
        # weight w: floor(w) full copies plus a fixed random share of the rest
        whole, part = divmod(weight, 1.0)
        train_parts.append(np.concatenate([np.tile(np.sort(rows), int(whole)),
                                           np.sort(rows[: round(part * len(rows))])]))
    return data.select(np.concatenate(train_parts)), evals
