"""Fine-tuning parts that ``recipes/finetune.py`` strings together.

- Typed recipe config: `ModelArguments`, `DataArguments`, `FinetuneArguments` (plus
  `unimodal.lora.LoraArguments`), read by `unimodal.training.parse_config`.
- `load_model_and_processor`: a hub/local LM, or a tiny one built from a config for offline runs,
  extended with the image tokenizer's tokens (`add_image_tokens`), or an already extended folder.
- `load_task_data`: the pre-tokenised samples, checked against the processor, mixed by task,
  with a held-out split per task.
- `check_compatibility`: model vs processor vs data, before any training step.
- `evaluate`: held-out loss per task, exact under data parallelism.
- `Throughput`: trained tokens/s and padding share of the training loop.

Export (merge, adapter, model card, Hub) lives in `unimodal.export`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedModel

from .lora import layer_rows
from .processor import PROCESSOR_CONFIG_NAME, UnimodalProcessor


@dataclass
class ModelArguments:
    """Which LM and image tokenizer to fine-tune.

    Args:
        model_name_or_path: hub name or folder of a causal LM. A folder written by a previous
            fine-tune (it has ``processor_config.json``) continues as is. None: build a tiny
            random LM from the ``build_*`` fields (offline runs, tests).
        tokenizer_name_or_path: the LM's text tokenizer (default: ``model_name_or_path``);
            required for built models: the one the data was tokenised with, before extension.
        image_tokenizer_path: VQGAN / PixelTokenizer folder; default: the one saved with the data.
        dtype: weights dtype at load (``float32`` or ``bfloat16``).
        image_rows_init: how new image-token rows start: ``"mean"`` of the text rows, or
            ``"codebook"`` (a projection of the image tokenizer's code vectors: similar-looking
            codes start close; see `unimodal.add_image_tokens`). Ignored for extended folders.
        build_model_type, build_hidden_size, build_num_layers, build_num_heads,
        build_tie_word_embeddings, build_seed: the tiny LM (`unimodal.lm.build_causal_lm`).
    """

    model_name_or_path: str | None = None
    tokenizer_name_or_path: str | None = None
    image_tokenizer_path: str | None = None
    dtype: str = "float32"
    image_rows_init: str = "mean"
    build_model_type: str = "llama"
    build_hidden_size: int = 64
    build_num_layers: int = 2
    build_num_heads: int = 4
    build_tie_word_embeddings: bool = False
    build_seed: int = 0


@dataclass
class DataArguments:
    """Pre-tokenised data (``recipes/tokenize_dataset.py``) and how batches are built from it.

    Args:
        dataset_path: folder written by ``recipes/tokenize_dataset.py``.
        eval_dataset_path: held-out folder; default: hold out ``eval_size`` samples per task.
        tasks: the task mix (``t2i``, ``i2t``, ``interleaved``); each must have samples.
        task_weights: per task, how often each sample is seen per epoch (1: once, 2: twice,
            0.5: a fixed random half). Default: all 1.
        eval_size: samples held out per task when there is no ``eval_dataset_path``.
        max_length, packing, loss_on, cfg_dropout: see `unimodal.data.UnimodalCollator`.
    """

    dataset_path: str = ""
    eval_dataset_path: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["t2i"])
    task_weights: list[float] = field(default_factory=list)
    eval_size: int = 32
    max_length: int = 512
    packing: bool = False
    loss_on: str = "auto"
    cfg_dropout: float = 0.1


@dataclass
class FinetuneArguments:
    """Training knobs, checkpoints, evaluation, sampling and export.

    Steps are optimizer steps (``gradient_accumulation_steps`` micro-batches each); ``max_steps``
    > 0 wins over ``num_epochs``. Checkpoints go to ``output_dir/checkpoints``; relaunching the
    same command resumes from the latest. The final model goes to ``output_dir/final``.
    """

    output_dir: str = "runs/finetune"
    max_steps: int = 0
    num_epochs: float = 1.0
    per_device_batch_size: int = 8
    eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    log_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 100
    keep_last: int = 2
    sample_prompts: list[str] = field(default_factory=list)
    sample_guidance_scale: float = 3.0
    merge_lora: bool = True
    report_to: str = "tensorboard"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True


# ----------------------------------------------------------------------------- model
def is_extended(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a unimodal folder (LM + processor) rather than a plain LM."""
    if Path(path).is_dir():
        return (Path(path) / PROCESSOR_CONFIG_NAME).exists()
    from transformers.utils import cached_file  # a Hub repo (or its offline cache)

    found = cached_file(str(path), PROCESSOR_CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
    return found is not None


def load_model_and_processor(
    args: ModelArguments, data_processor: UnimodalProcessor | None = None
) -> tuple[PreTrainedModel, UnimodalProcessor]:
    """The LM to fine-tune and its processor; ``data_processor`` supplies the default image
    tokenizer. Call it before creating the Accelerator (see docs/distributed.md, ZeRO-3)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .lm import build_causal_lm
    from .vocab import add_image_tokens

    dtype = getattr(torch, args.dtype)
    path = args.model_name_or_path
    if path and is_extended(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, UnimodalProcessor.from_pretrained(path)
    tokenizer_path = args.tokenizer_name_or_path or path
    if tokenizer_path is None:
        raise ValueError("a model built from a config needs tokenizer_name_or_path: the text tokenizer "
                         "the data was tokenised with (before image tokens were added)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if path:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = build_causal_lm(
            args.build_model_type, vocab_size=len(tokenizer), hidden_size=args.build_hidden_size,
            num_layers=args.build_num_layers, num_heads=args.build_num_heads,
            tie_word_embeddings=args.build_tie_word_embeddings, seed=args.build_seed,
        ).to(dtype)
    if args.image_tokenizer_path:
        image_tokenizer = AutoModel.from_pretrained(args.image_tokenizer_path)
    elif data_processor is not None:
        image_tokenizer = data_processor.image_tokenizer
    else:
        raise ValueError("no image tokenizer: set image_tokenizer_path or give pre-tokenised data")
    return model, add_image_tokens(model, tokenizer, image_tokenizer, image_rows_init=args.image_rows_init)


def new_token_ids(processor: UnimodalProcessor) -> list[int]:
    """Ids whose rows `add_image_tokens` created and training must teach: ``<boi>``, ``<eoi>``
    and the image tokens (one contiguous range; see `unimodal.vocab`)."""
    ids = {processor.boi_token_id, processor.eoi_token_id, *range(*processor.image_token_range)}
    return sorted(ids)


# ----------------------------------------------------------------------------- data
def load_task_data(
    args: DataArguments, processor: UnimodalProcessor, seed: int = 0
) -> tuple[datasets.Dataset, dict[str, datasets.Dataset]]:
    """``(train samples mixed by task, {task: held-out samples})``.

    Raises a ``ValueError`` for data tokenised with another processor, an empty data set, a task
    without samples, or weights that do not match the tasks.
    """
    from .data import load_pretokenized, read_metadata

    stats = read_metadata(args.dataset_path)["stats"]
    if stats["num_samples"] == 0:  # (datasets cannot even load an empty Arrow/parquet folder)
        raise ValueError(f"{args.dataset_path} holds no samples: {stats['num_skipped']} of {stats['num_examples']} "
                         f"source rows were skipped ({stats['skipped'][:3]}); fix the source data and "
                         "re-run recipes/tokenize_dataset.py")
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
            evals[task] = held_out.filter(lambda t: t == task, input_columns="task")
        # weight w: floor(w) full copies plus a fixed random share of the rest
        whole, part = divmod(weight, 1.0)
        train_parts.append(np.concatenate([np.tile(np.sort(rows), int(whole)),
                                           np.sort(rows[: round(part * len(rows))])]))
    return data.select(np.concatenate(train_parts)), evals


def check_compatibility(model: PreTrainedModel, processor: UnimodalProcessor, data: datasets.Dataset,
                        num_checked: int = 256) -> None:
    """Raise a ``ValueError`` that says what to do when model, processor and data disagree:
    too few embedding rows for the processor's ids, an LM extended for other image/control ids,
    or stored image spans whose length is not the image tokenizer's ``h * w``."""
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    rows = min(layer_rows(layer) for layer in layers if layer is not None)
    needed = len(processor.tokenizer)
    if rows < needed:
        raise ValueError(f"the LM has {rows} embedding rows but the processor uses ids up to "
                         f"{needed - 1}; extend it with unimodal.add_image_tokens (the image tokenizer has "
                         f"codebook_size={processor.image_tokenizer.codebook_size})")
    recorded = getattr(model.config, "unimodal", None)
    if recorded:
        ours = {"boi_token_id": processor.boi_token_id, "eoi_token_id": processor.eoi_token_id,
                "image_token_range": list(processor.image_token_range), "grid_shape": list(processor.grid_shape)}
        for key, value in ours.items():
            if list(np.atleast_1d(recorded.get(key))) != list(np.atleast_1d(value)):
                raise ValueError(f"the LM was extended with {key}={recorded.get(key)} but the processor has "
                                 f"{value}; load the processor saved with this LM")
    sample = data.select(range(min(num_checked, len(data))))["input_ids"]
    boi, eoi, hw = processor.boi_token_id, processor.eoi_token_id, processor.num_image_tokens
    for i, ids in enumerate(sample):
        ids = np.asarray(ids)
        if ids.max() >= needed:
            raise ValueError(f"sample {i} holds id {ids.max()} >= vocabulary size {needed}")
        for start, end in zip(np.flatnonzero(ids == boi), np.flatnonzero(ids == eoi)):
            if end - start - 1 != hw:
                raise ValueError(f"sample {i} has an image span of {end - start - 1} tokens but the image "
                                 f"tokenizer makes {hw} ({processor.grid_shape}); the data was built for "
                                 "another grid: re-run tokenize_dataset with this image tokenizer")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(accelerator, model, loaders: dict[str, torch.utils.data.DataLoader]) -> dict[str, float]:
    """Mean held-out loss per target token, per task: ``{"eval/t2i": 2.31, ...}``.

    Token sums and counts are summed over all processes, so the value does not depend on the
    number of processes (accelerate's duplicated samples in a last uneven batch are not counted:
    every process runs the same number of batches, which ZeRO-3 needs, padding included).
    """
    was_training = model.training
    model.eval()
    results = {}
    for task, loader in loaders.items():
        total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # [loss sum, tokens]
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()  # [B, T, V]
            targets = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )  # [B, T-1]
            per_row = torch.stack([losses.sum(1), (targets != -100).sum(1)], 1).double()  # [B, 2]
            total += accelerator.gather_for_metrics(per_row).sum(0)
        results[f"eval/{task}"] = (total[0] / total[1].clamp(min=1)).item()
    model.train(was_training)
    return results


# ----------------------------------------------------------------------------- throughput
class Throughput:
    """Trained (non-pad) tokens per second of the training loop.

    Counts the time from the end of one micro-step to the end of the next (data loading
    included), except across evaluation, sampling and checkpoints: call `skip` after those. The
    first micro-step of a launch is not counted (lazy initialisation, allocator warm-up). Besides
    wall-clock ``seconds`` it keeps this process's CPU time (``cpu_seconds``): on a machine shared
    with other jobs that is the steadier measure.
    """

    def __init__(self):
        self.tokens = self.positions = 0  # summed over processes
        self.seconds = self.cpu_seconds = 0.0
        self._last: tuple[float, float] | None = None  # (wall, cpu) at the last tick
        self._window = [0, 0.0]  # tokens, seconds since the last `window_rate`

    def skip(self) -> None:
        """Restart the clock: the time since the last tick is not training time."""
        self._last = (time.perf_counter(), time.process_time())

    def tick(self, tokens: int, positions: int) -> None:
        """One micro-step done: ``tokens`` non-pad tokens out of ``positions`` (batch x length)."""
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self.seconds += now[0] - self._last[0]
            self.cpu_seconds += now[1] - self._last[1]
            self.tokens += tokens
            self.positions += positions
            self._window[0] += tokens
            self._window[1] += now[0] - self._last[0]
        self._last = now

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.positions if self.positions else 0.0

    def window_rate(self) -> float:
        """Tokens/s since the previous call (for the progress bar and logs)."""
        tokens, seconds = self._window
        self._window = [0, 0.0]
        return tokens / seconds if seconds else 0.0

    def save(self, path: str | os.PathLike, **extra) -> None:
        """Write ``train_stats.json``: tokens, seconds, tokens/s, padding share (+ ``extra``)."""
        stats = {"tokens": self.tokens, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                 "tokens_per_s": self.tokens_per_s, "padding_fraction": self.padding_fraction, **extra}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(stats, indent=2) + "\n")
