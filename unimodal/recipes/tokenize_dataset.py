"""Pre-tokenise a data set once, so fine-tuning never runs the image encoder.

    unimodal tokenize-dataset --config my.yaml                                   # installed package
    python recipes/tokenize_dataset.py --config examples/digits/tokenize.yaml \
        --source outputs/digits-demo/digits-train-lm --image_tokenizer outputs/digits-demo/tokenizer/final \
        --tokenizer outputs/digits-demo/text-tokenizer --output_dir outputs/digits_data  # a clone, after `make demo`
    accelerate launch --num_processes 8 -m unimodal.recipes.tokenize_dataset --config my.yaml   # 8 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        recipes/tokenize_dataset.py --config my.yaml                                     # 2 CPU procs

Each process encodes one contiguous shard of the source, in parts of ``part_rows`` rows kept in
``.<output_dir>-parts`` as they finish; the parts are then merged, in order, into ``output_dir``
(identical to a one-process run). On SIGTERM / SIGUSR1 every process stops before its next
batch and exits with code 75; relaunching the same command encodes only the parts not finished.
``output_dir`` gets the samples (Arrow or parquet), ``unimodal_data.json`` (counts, options, the
ids the data depends on) and the processor in ``processor/``. Read it back with ``unimodal.data.load_pretokenized``.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

import unimodal  # noqa: F401  (registers the image tokenizers with AutoModel)
from unimodal.bases import base_for
from unimodal.data import PretokenizeOptions, load_source, save_pretokenized, shard_bounds
from unimodal.data.pretokenize import Interrupted, load_parts, pretokenize_parts
from unimodal.errors import OutputExistsError, UserError, bad_input
from unimodal.extend import add_image_tokens
from unimodal.offline import build_causal_lm
from unimodal.processor import UnimodalProcessor
from unimodal.training import PREEMPTED_EXIT_CODE, Preempted, Preemption, make_accelerator, parse_config


@dataclass
class TokenizeConfig:
    """Options of ``unimodal tokenize-dataset`` (YAML keys or ``--name value`` flags)."""

    source: str = ""  # image folder + captions, .jsonl/.parquet, save_to_disk folder, or Hub name
    split: str = "train"
    output_dir: str = "outputs/digits_data"
    overwrite: bool = False  # replace an existing output_dir
    output_format: str = "arrow"  # or "parquet"
    # Where the ids come from: a saved UnimodalProcessor, or the text tokenizer + image tokenizer
    # extended exactly as add_image_tokens will extend the LM (fine-tuning checks they match).
    processor: str = ""
    # A unified base (Chameleon/Anole, Emu3, Janus folder or Hub name): its own processor, format and VQ.
    model_name_or_path: str = ""
    image_tokenizer: str = ""  # VQGAN / PixelTokenizer folder
    base_model: str = ""  # hub name or folder of the LM: its tokenizer and config (no weights read)
    tokenizer: str = ""  # the text tokenizer, when not base_model's (an LM built from a config)
    tasks: list[str] = field(default_factory=lambda: ["t2i"])  # t2i, i2t, interleaved
    image_column: str = "image"
    caption_column: str = "caption"
    text_column: str = "text"
    images_column: str = "images"
    keep_columns: list[str] = field(default_factory=list)  # copied into every sample, e.g. label
    batch_size: int = 64  # images per encoder call
    num_proc: int = 1  # CPU worker processes per launched process
    cache_dir: str = ""  # pre-tokenisation cache (default: the datasets cache)
    part_rows: int = 4096  # source rows per part kept once finished (a relaunch resumes after the last)
    preemption_grace_s: float = 30.0  # SIGTERM / SIGUSR1: stop before the next batch, keep finished parts


def load_processor(cfg: TokenizeConfig) -> UnimodalProcessor:
    for path in (cfg.model_name_or_path, cfg.processor, cfg.base_model):
        unified = base_for(path) if path else None
        if unified is not None:  # nothing is added to a unified base's vocabulary
            return unified.load_processor(path)
    if cfg.model_name_or_path:
        raise UserError(f"model_name_or_path {cfg.model_name_or_path!r} is not a unified base (Chameleon, Emu3, "
                        "Janus); for another LM set base_model (or tokenizer) and image_tokenizer")
    if cfg.processor:
        return UnimodalProcessor.from_pretrained(cfg.processor)
    if not (cfg.image_tokenizer and (cfg.base_model or cfg.tokenizer)):
        raise UserError("set `processor`, or `image_tokenizer` and `base_model` (or `tokenizer`)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.base_model)
    image_tokenizer = AutoModel.from_pretrained(cfg.image_tokenizer)
    # Only the LM's embedding rows decide the new ids, so the LM is built on the meta device (no
    # weights); an LM built from a config has exactly one row per text token.
    with torch.device("meta"):
        lm = (AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.base_model)) if cfg.base_model
              else build_causal_lm(vocab_size=len(tokenizer)))
    return add_image_tokens(lm, tokenizer, image_tokenizer, mean_resizing=False)


def main(args: list[str] | None = None, prog: str | None = None) -> None:
    (cfg,) = parse_config((TokenizeConfig,), args, prog=prog, description=__doc__)
    if not cfg.source:
        raise UserError("set `source`: an image folder with metadata.jsonl captions, a .jsonl/.parquet file, "
                        "a save_to_disk folder or a Hub data set name (docs/data.md)")
    accelerator = make_accelerator(log_with=None)
    rank, world = accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()
    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:  # every rank checks, so every rank stops
        raise OutputExistsError(f"{out} exists; pass --overwrite true or choose another output_dir")
    if accelerator.is_main_process and out.exists():
        shutil.rmtree(out)

    processor = load_processor(cfg)
    processor.image_tokenizer.to(accelerator.device).eval()
    source = load_source(cfg.source, cfg.split, cfg.cache_dir or None)
    source_path = Path(cfg.source)
    base_dir = source_path.parent if source_path.is_file() else None  # for relative image paths
    options = PretokenizeOptions(
        tasks=tuple(cfg.tasks), image_column=cfg.image_column, caption_column=cfg.caption_column,
        text_column=cfg.text_column, images_column=cfg.images_column, keep_columns=tuple(cfg.keep_columns),
    )

    # This process's contiguous shard, in parts of part_rows kept once finished: a relaunch after
    # a preemption (or a kill) encodes only the parts not done yet. Row order is kept throughout.
    parts = out.parent / f".{out.name}-parts"
    ranges = [shard_bounds(len(source), world, r) for r in range(world)]
    start, end = ranges[rank]
    preemption = Preemption(cfg.preemption_grace_s)  # SIGTERM / SIGUSR1: stop before the next batch
    if accelerator.is_main_process and parts.is_dir():
        print(f"{len(list(parts.glob('rows-*')))} finished part(s) in {parts} are kept from an earlier run",
              flush=True)
    try:
        with bad_input():  # parts of another run's inputs
            stats = pretokenize_parts(
                source, processor, options, parts, start, end, cfg.part_rows, stop=lambda: preemption.requested,
                base_dir=base_dir, batch_size=cfg.batch_size, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                cache_dir=cfg.cache_dir or None)
    except Interrupted:
        done = len(list(parts.glob("rows-*")))
        message = (f"preempted ({preemption.signal_name}): process {rank} stopped; the {done} finished part(s) in "
                   f"{parts} are kept. Exiting with code {PREEMPTED_EXIT_CODE}; relaunch the same command to resume.")
        print(message, file=sys.stderr, flush=True)
        raise Preempted(message) from None
    finally:
        preemption.restore()
    print(f"process {rank}/{world}: rows [{start}, {end}) -> {stats.num_samples} samples", flush=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result = load_parts(parts, len(source), cfg.part_rows, ranges)
        save_pretokenized(result, out, processor, options, cfg.output_format)
        shutil.rmtree(parts)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        stats = json.loads((out / "unimodal_data.json").read_text())["stats"]
        print(f"wrote {stats['num_samples']} samples from {stats['num_examples']} rows to {out} "
              f"({stats['num_skipped']} rows skipped, {world} process(es))")
        for reason in stats["skipped"]:
            print(f"  skipped {reason}")
    accelerator.end_training()


if __name__ == "__main__":
    from unimodal.cli import run_recipe

    run_recipe(main)
