"""Pre-tokenisation: run the image tokenizer once over a data set and store LM id sequences.

Fine-tuning then reads ``input_ids`` from Arrow (or parquet) and never runs the VQ encoder. One
stored row is one training sample::

    input_ids     list<int32>  the whole sequence, e.g. <bos> caption <boi> h*w ids <eoi> <eos>
    task          string       "t2i", "i2t" or "interleaved"
    cond_len      int32        t2i: length of the generation prompt <bos> caption <boi> (what
                               condition dropout swaps for the unconditional prompt); else 0
    length        int32        len(input_ids), so packing plans without reading the ids
    source_index  int64        row of the source data set the sample came from

plus any ``keep_columns`` copied from the source (e.g. ``label``). Images that cannot be decoded
are skipped and counted; the work is cached by a fingerprint of (source data, tokenizers,
options), so a second run with the same inputs reads the cache instead of encoding again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow.compute as pc
from PIL import Image

from ..images import open_image

if TYPE_CHECKING:
    from ..processor import UnimodalProcessor

TASKS = ("t2i", "i2t", "interleaved")
SAMPLE_COLUMNS = ("input_ids", "task", "cond_len", "length", "source_index")
FORMAT_VERSION = 1  # bump when the stored row layout or the id construction changes
_SKIPPED = "skipped"  # task value of the placeholder row a failed source row leaves behind
_MAX_REPORTED = 20  # error messages kept for the report


class Interrupted(Exception):
    """`pretokenize` stopped because its ``stop`` callback said so (a preemption signal)."""


@dataclass
class PretokenizeOptions:
    """Which columns hold what, and which samples to build from each source row."""

    tasks: tuple[str, ...] = ("t2i",)
    image_column: str = "image"  # t2i / i2t: one image per row
    caption_column: str = "caption"
    text_column: str = "text"  # interleaved: text with <image> placeholders ...
    images_column: str = "images"  # ... and the list of images they refer to, in order
    keep_columns: tuple[str, ...] = ()  # copied unchanged into every sample of the row

    def __post_init__(self):
        self.tasks, self.keep_columns = tuple(self.tasks), tuple(self.keep_columns)
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(self.tasks)}")
        clash = sorted(set(self.keep_columns) & {*SAMPLE_COLUMNS, "error"})
        if clash:
            raise ValueError(f"keep_columns {clash} clash with the columns pre-tokenisation writes")

    def required_columns(self) -> list[str]:
        cols = []
        if {"t2i", "i2t"} & set(self.tasks):
            cols += [self.image_column, self.caption_column]
        if "interleaved" in self.tasks:
            cols += [self.text_column, self.images_column]
        return cols + list(self.keep_columns)


@dataclass
class PretokenizeStats:
    """What happened to the source rows."""

    num_examples: int = 0  # source rows read
    num_samples: int = 0  # rows written (one per task per good source row)
    num_skipped: int = 0  # source rows skipped (unreadable image, missing caption, ...)
    skipped: list[str] = field(default_factory=list)  # the first reasons, "row 17: OSError: ..."

    def merge(self, other: PretokenizeStats) -> PretokenizeStats:
        return PretokenizeStats(
            self.num_examples + other.num_examples, self.num_samples + other.num_samples,
            self.num_skipped + other.num_skipped, (self.skipped + other.skipped)[:_MAX_REPORTED],
        )


def processor_signature(processor: UnimodalProcessor) -> dict[str, Any]:
    """The facts stored ids depend on; data is usable with a processor only if these match."""
    config = processor.image_tokenizer.config
    return {
        "text_vocab_size": len(processor.tokenizer),
        "bos_token_id": processor.bos_token_id,
        "eos_token_id": processor.eos_token_id,
        "pad_token_id": processor.pad_token_id,
        "boi_token_id": processor.boi_token_id,
        "eoi_token_id": processor.eoi_token_id,
        "image_token_range": list(processor.image_token_range),
        "grid_shape": list(processor.grid_shape),
        "image_size": int(config.image_size),
        "image_tokenizer_type": config.model_type,
        "image_tokenizer_sha256": _weights_sha256(processor.image_tokenizer),
    }


def _weights_sha256(module) -> str:
    """Hash of the image tokenizer's weights, read as float32 on the CPU (so the same weights
    hash the same on any device)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(dataset: datasets.Dataset, processor: UnimodalProcessor, options: PretokenizeOptions) -> str:
    """Cache key of a pre-tokenisation: source data, text tokenizer, image tokenizer, options.

    Computed by us rather than by ``datasets`` hashing the map function, because that would pickle
    the whole image tokenizer on every call and, for objects it cannot hash, silently fall back to
    a random key (no caching at all).
    """
    digest = hashlib.sha256()
    digest.update(dataset._fingerprint.encode())
    tokenizer = processor.tokenizer
    vocab = (tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast
             else json.dumps(tokenizer.get_vocab(), sort_keys=True))
    digest.update(vocab.encode())
    # The architecture, not where it was loaded from or which transformers wrote it.
    config = {k: v for k, v in processor.image_tokenizer.config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}
    parts = {"version": FORMAT_VERSION, "options": asdict(options), "processor": processor_signature(processor),
             "image_tokenizer_config": config}
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------- sources
def load_source(source: str | os.PathLike | datasets.Dataset, split: str = "train",
                cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """Open a data set from any of the supported inputs.

    - a ``datasets.Dataset`` (returned as is);
    - a folder written by ``Dataset.save_to_disk``;
    - an image folder with captions (``metadata.jsonl``/``metadata.csv`` next to the images);
    - a ``.jsonl``/``.json`` or ``.parquet`` file (or a glob) whose image column holds paths
      (relative paths are resolved against the file's folder by `pretokenize`'s ``base_dir``) or
      encoded bytes;
    - otherwise a Hub data set name, loaded with ``load_dataset(name, split=split)``.
    """
    if isinstance(source, datasets.Dataset):
        return source
    path = Path(source)
    kw = {"cache_dir": str(cache_dir)} if cache_dir else {}
    if path.is_dir() and (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    if path.is_dir():
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split, **kw)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return datasets.load_dataset("json", data_files=str(path), split="train", **kw)
    if suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train", **kw)
    return datasets.load_dataset(str(source), split=split, **kw)


def _undecoded(dataset: datasets.Dataset, columns: Sequence[str]) -> datasets.Dataset:
    """Make image columns yield raw ``{"bytes", "path"}`` so a corrupt file can be caught per row
    (a decoding ``Image`` feature raises for the whole batch)."""
    for name in columns:
        feature = dataset.features.get(name)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return dataset


# ---------------------------------------------------------------------------------- encoding
class _Encoder:
    """The batched map function: decode images, encode them in one call, build the samples."""

    def __init__(self, processor: UnimodalProcessor, options: PretokenizeOptions, base_dir: Path | None,
                 index_offset: int, stop: Callable[[], bool] | None = None):
        self.processor, self.options, self.base_dir, self.offset = processor, options, base_dir, index_offset
        self.stop = stop

    def _images_of(self, batch: dict[str, list], i: int) -> list[Image.Image]:
        o = self.options
        images = []
        if {"t2i", "i2t"} & set(o.tasks):
            if batch[o.caption_column][i] is None:
                raise ValueError(f"missing caption in column {o.caption_column!r}")
            images.append(open_image(batch[o.image_column][i], self.base_dir))
        if "interleaved" in o.tasks:
            text, refs = batch[o.text_column][i], batch[o.images_column][i] or []
            slots = len(self.processor.split_placeholders(text or "")) - 1
            if slots != len(refs):
                raise ValueError(f"text has {slots} {self.processor.image_placeholder} placeholders "
                                 f"but {len(refs)} images")
            images += [open_image(ref, self.base_dir) for ref in refs]
        return images

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        if self.stop is not None and self.stop():
            raise Interrupted("pre-tokenisation was asked to stop")
        o, p = self.options, self.processor
        decoded: list[list[Image.Image] | str] = []
        for i in range(len(indices)):
            try:
                decoded.append(self._images_of(batch, i))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                decoded.append(f"row {self.offset + indices[i]}: {type(err).__name__}: {err}")
        flat = [im for d in decoded if not isinstance(d, str) for im in d]
        # One encoder call for every image of the batch: codes [N, h, w] on the tokenizer's device.
        codes = iter(p.encode_images(flat).cpu()) if flat else iter(())

        out: dict[str, list] = {k: [] for k in ("input_ids", "task", "cond_len", "source_index", "error",
                                                *o.keep_columns)}

        def emit(ids: list[int], task: str, cond_len: int, i: int, error: str | None = None) -> None:
            out["input_ids"].append(ids)
            out["task"].append(task)
            out["cond_len"].append(cond_len)
            out["source_index"].append(self.offset + indices[i])
            out["error"].append(error)
            for name in o.keep_columns:
                out[name].append(batch[name][i])

        for i, item in enumerate(decoded):
            if isinstance(item, str):  # a placeholder row, so the skip is counted even from cache
                emit([], _SKIPPED, 0, i, item)
                continue
            grids = [next(codes) for _ in item]
            if {"t2i", "i2t"} & set(o.tasks):
                caption, grid = batch[o.caption_column][i], grids.pop(0)
            if "t2i" in o.tasks:
                ids = p.text_to_image_ids(caption, grid)
                # The prompt is everything up to <boi>: ids = prompt + span tail + <eos>, the tail
                # h*w + <eoi> (a unified base's span may hold more: its span_tail_len).
                cond_len = len(ids) - getattr(p, "span_tail_len", p.num_image_tokens + 1) - 1
                if ids[cond_len - 1] != p.boi_token_id:
                    raise RuntimeError("the processor's t2i format changed: the prompt must end in <boi>")
                emit(ids, "t2i", cond_len, i)
            if "i2t" in o.tasks:
                emit(p.image_to_text_ids(grid, caption), "i2t", 0, i)
            if "interleaved" in o.tasks:
                # <bos> text0 <boi>..<eoi> text1 ... <eos>: each placeholder becomes an image span
                ids = p.interleaved_ids([batch[o.text_column][i] or ""], grids, add_bos=True, add_eos=True)[0]
                emit(ids, "interleaved", 0, i)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out


@dataclass
class PretokenizeResult:
    dataset: datasets.Dataset  # the samples (columns in the module docstring)
    stats: PretokenizeStats


def pretokenize(
    dataset: datasets.Dataset,
    processor: UnimodalProcessor,
    options: PretokenizeOptions | None = None,
    *,
    base_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    index_offset: int = 0,
    stop: Callable[[], bool] | None = None,
) -> PretokenizeResult:
    """Encode every image of ``dataset`` once and build the LM samples of ``options.tasks``.

    Args:
        dataset: source rows (see `load_source`).
        processor: builds the ids; its image tokenizer runs on its current device (move it to a
            GPU first to encode there).
        options: columns and tasks.
        base_dir: folder that relative image paths are relative to.
        batch_size: images per encoder call.
        num_proc: CPU worker processes (on a GPU use ``accelerate launch`` with N processes).
        cache_dir: where the result is cached, keyed by `fingerprint`; a second call with the
            same inputs loads it without running the encoder. Default: the datasets cache.
        index_offset: added to ``source_index`` (the start of this shard in the full data set).
        stop: asked before each batch; True raises `Interrupted` (nothing is cached). Only in
            this process: with ``num_proc`` workers use `pretokenize_parts`' check between parts.
    """
    options = options or PretokenizeOptions()
    missing = [c for c in options.required_columns() if c not in dataset.column_names]
    if missing:
        raise ValueError(f"columns {missing} not found (the data set has {dataset.column_names}); set "
                         "image_column / caption_column / text_column / images_column to the right names")
    if num_proc and num_proc > 1 and processor.image_tokenizer.device.type != "cpu":
        raise ValueError("num_proc > 1 forks CPU workers and cannot share a GPU; use "
                         "`accelerate launch --num_processes N` (one shard per GPU) instead")
    dataset = _undecoded(dataset.select_columns(options.required_columns()),
                         [options.image_column, options.images_column])
    key = fingerprint(dataset, processor, options)
    cache_dir = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "unimodal_pretokenize"
    cache_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "task": datasets.Value("string"),
        "cond_len": datasets.Value("int32"),
        "source_index": datasets.Value("int64"),
        "error": datasets.Value("string"),
        **{name: dataset.features[name] for name in options.keep_columns},
        "length": datasets.Value("int32"),
    })
    encoded = dataset.map(
        _Encoder(processor, options, Path(base_dir) if base_dir else None, index_offset,
                 stop if not num_proc or num_proc <= 1 else None),
        with_indices=True, batched=True, batch_size=batch_size, num_proc=num_proc,
        remove_columns=dataset.column_names, features=features, new_fingerprint=key,
        cache_file_name=str(cache_dir / f"pretokenized-{key}.arrow"), desc="pre-tokenising",
    )
    failed = pc.equal(encoded.data.column("task"), _SKIPPED).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(failed)
    stats = PretokenizeStats(
        num_examples=len(dataset), num_samples=int(len(encoded) - len(bad)), num_skipped=int(len(bad)),
        skipped=list(encoded.select(bad[:_MAX_REPORTED])["error"]) if len(bad) else [],
    )
    good = encoded.select(np.flatnonzero(~failed)) if len(bad) else encoded
    return PretokenizeResult(good.remove_columns("error"), stats)


# ---------------------------------------------------------------------------------- parts
def part_bounds(start: int, end: int, part_rows: int) -> list[tuple[int, int]]:
    """``[a, b)`` row ranges of at most ``part_rows`` rows tiling ``[start, end)`` in order."""
    return [(a, min(a + part_rows, end)) for a in range(start, end, part_rows)]


def _part_dir(parts_dir: Path, a: int, b: int) -> Path:
    return parts_dir / f"rows-{a:010d}-{b:010d}"


def pretokenize_parts(dataset: datasets.Dataset, processor: UnimodalProcessor, options: PretokenizeOptions,
                      parts_dir: str | os.PathLike, start: int, end: int, part_rows: int,
                      stop: Callable[[], bool] | None = None, **kwargs: Any) -> PretokenizeStats:
    """`pretokenize` rows ``[start, end)`` of ``dataset`` in parts of ``part_rows`` rows, each kept
    in ``parts_dir`` once finished (written to a temporary folder, then renamed). Parts already
    there are not encoded again, so a run stopped by ``stop`` (raises `Interrupted`) or killed
    loses at most the part in progress. ``parts_dir/parts.json`` records the inputs: parts made
    from other data, tokenizers or options are refused (ValueError), never mixed in. ``kwargs``
    go to `pretokenize`. Returns the stats of this range; `load_parts` reads the parts back."""
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    inputs = {"fingerprint": fingerprint(dataset, processor, options), "num_rows": len(dataset)}
    manifest = parts_dir / "parts.json"
    if manifest.exists() and json.loads(manifest.read_text()) != inputs:
        raise ValueError(f"{parts_dir} holds parts of an unfinished pre-tokenisation of other data, tokenizers "
                         "or options; delete it (or relaunch with the settings that wrote it)")
    if start == 0:
        manifest.write_text(json.dumps(inputs))
    stats = PretokenizeStats()
    for a, b in part_bounds(start, end, part_rows):
        final = _part_dir(parts_dir, a, b)
        if not (final / "stats.json").exists():
            if stop is not None and stop():
                raise Interrupted(f"stopped before rows [{a}, {b})")
            result = pretokenize(dataset.select(range(a, b)), processor, options, index_offset=a, stop=stop, **kwargs)
            tmp = parts_dir / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
            result.dataset.save_to_disk(str(tmp))
            (tmp / "stats.json").write_text(json.dumps(asdict(result.stats)))
            os.replace(tmp, final)
        stats = stats.merge(PretokenizeStats(**json.loads((final / "stats.json").read_text())))
    return stats


def load_parts(parts_dir: str | os.PathLike, num_rows: int, part_rows: int,
               ranges: Sequence[tuple[int, int]]) -> PretokenizeResult:
    """The parts `pretokenize_parts` wrote for the row ``ranges`` (in order), as one result."""
    parts = [_part_dir(Path(parts_dir), a, b) for start, end in ranges for a, b in part_bounds(start, end, part_rows)]
    stats = PretokenizeStats()
    for part in parts:
        stats = stats.merge(PretokenizeStats(**json.loads((part / "stats.json").read_text())))
    assert stats.num_examples == num_rows, (stats.num_examples, num_rows)
    return PretokenizeResult(datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in parts]), stats)
