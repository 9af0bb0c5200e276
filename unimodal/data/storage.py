"""Pre-tokenised data on disk: save, load (with a processor check), shard bounds, merge.

A pre-tokenised folder holds the samples (``save_to_disk`` Arrow files or ``data/*.parquet``),
``unimodal_data.json`` (format version, counts, options, the processor facts the ids depend on)
and the processor that built them in ``processor/``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from .pretokenize import FORMAT_VERSION, PretokenizeOptions, PretokenizeResult, PretokenizeStats, processor_signature

if TYPE_CHECKING:
    from ..processor import UnimodalProcessor

METADATA_NAME = "unimodal_data.json"
PROCESSOR_SUBFOLDER = "processor"


def save_pretokenized(result: PretokenizeResult, path: str | os.PathLike, processor: UnimodalProcessor,
                      options: PretokenizeOptions, output_format: str = "arrow") -> Path:
    """Write the samples (``save_to_disk`` Arrow, or ``data/*.parquet``), ``unimodal_data.json``
    (stats, options, processor signature) and the processor itself in ``processor/``."""
    if output_format not in ("arrow", "parquet"):
        raise ValueError(f"output_format must be 'arrow' or 'parquet', got {output_format!r}")
    path = Path(path)
    if output_format == "arrow":
        result.dataset.save_to_disk(str(path))
    else:
        (path / "data").mkdir(parents=True, exist_ok=True)
        result.dataset.to_parquet(str(path / "data" / "samples.parquet"))
    processor.save_pretrained(path / PROCESSOR_SUBFOLDER)
    meta = {"format_version": FORMAT_VERSION, "output_format": output_format, "stats": asdict(result.stats),
            "options": asdict(options), "processor": processor_signature(processor)}
    (path / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``unimodal_data.json`` of a pre-tokenised folder."""
    meta_file = Path(path) / METADATA_NAME
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a pre-tokenised data set (no {METADATA_NAME}); create one with "
                                "`unimodal tokenize-dataset` (recipes/tokenize_dataset.py in a clone)")
    return json.loads(meta_file.read_text())


def load_pretokenized(path: str | os.PathLike, processor: UnimodalProcessor | None = None) -> datasets.Dataset:
    """Load samples written by `save_pretokenized` / ``recipes/tokenize_dataset.py``.

    With ``processor`` given, checks that its ids match the ones the data was built with (same
    text vocabulary, control ids, image id range, grid and image tokenizer weights) and raises a
    ``ValueError`` naming the first difference otherwise. The processor the data was built with
    is saved next to it: ``UnimodalProcessor.from_pretrained(path / PROCESSOR_SUBFOLDER)``.
    """
    meta = read_metadata(path)
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has data format {meta['format_version']}, this unimodal reads "
                         f"{FORMAT_VERSION}; re-run `unimodal tokenize-dataset` (recipes/tokenize_dataset.py)")
    if processor is not None:
        ours = processor_signature(processor)
        for key, stored in meta["processor"].items():
            if ours.get(key) != stored:
                raise ValueError(
                    f"{path} was tokenised with {key}={stored} but this processor has {ours.get(key)}; "
                    "use the processor saved with the data (its 'processor/' folder) or re-run "
                    "`unimodal tokenize-dataset` (recipes/tokenize_dataset.py) with this one")
    if meta["output_format"] == "parquet":
        files = sorted(str(f) for f in (Path(path) / "data").glob("*.parquet"))
        return datasets.Dataset.from_parquet(files)
    return datasets.load_from_disk(str(path))


def shard_bounds(num_rows: int, num_shards: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of contiguous shard ``index``: concatenating shards in order gives the
    rows in their original order (the first ``num_rows % num_shards`` shards get one extra)."""
    size, extra = divmod(num_rows, num_shards)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def merge_shards(shard_paths: Sequence[str | os.PathLike], path: str | os.PathLike,
                 output_format: str = "arrow") -> Path:
    """Concatenate shards written by `save_pretokenized` (in the given order) into ``path``,
    summing their stats; the shard folders are removed afterwards."""
    metas = [read_metadata(p) for p in shard_paths]
    stats = PretokenizeStats()
    for meta in metas:
        stats = stats.merge(PretokenizeStats(**meta["stats"]))
    merged = datasets.concatenate_datasets([load_pretokenized(p) for p in shard_paths])
    path = Path(path)
    if output_format == "arrow":
        merged.save_to_disk(str(path))
    else:
        (path / "data").mkdir(parents=True, exist_ok=True)
        merged.to_parquet(str(path / "data" / "samples.parquet"))
    shutil.copytree(Path(shard_paths[0]) / PROCESSOR_SUBFOLDER, path / PROCESSOR_SUBFOLDER, dirs_exist_ok=True)
    meta = {**metas[0], "output_format": output_format, "stats": asdict(stats)}
    (path / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    for p in shard_paths:
        shutil.rmtree(p)
    return path
