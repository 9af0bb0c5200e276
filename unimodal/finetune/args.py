"""The typed config of `unimodal.recipes.finetune`: which model, which data, which training knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..training.config import RunArguments
from ..training.mlp_chunks import MLP_CHUNK_SIZE


@dataclass
class ModelArguments:
    """Which LM and image tokenizer to fine-tune.

    Args:
        model_name_or_path: hub name or folder of a causal LM. A folder written by a previous
            fine-tune (it has ``processor_config.json``) continues as is. None: build a random LM
            from ``build`` (offline runs, tests).
        tokenizer_name_or_path: the LM's text tokenizer (default: ``model_name_or_path``);
            required for built models: the one the data was tokenised with, before extension.
        image_tokenizer_path: VQGAN / PixelTokenizer folder; default: the one saved with the data.
        dtype: weights dtype at load (``float32`` or ``bfloat16``).
        image_rows_init: how new image-token rows start: ``"mean"`` of the text rows, or
            ``"codebook"`` (a projection of the image tokenizer's code vectors: similar-looking
            codes start close; see `unimodal.add_image_tokens`). Ignored for extended folders.
        build: the LM built when there is no ``model_name_or_path``: keyword arguments of
            `unimodal.offline.build_causal_lm` (``model_type``, ``hidden_size``, ``num_layers``,
            ``num_heads``, ``intermediate_size``, ``tie_word_embeddings``, ``seed``, ...) and any
            other field of that architecture's config, by its transformers name (``rope_theta``).
            Missing keys take `build_causal_lm`'s defaults (a tiny Llama); ``vocab_size`` and the
            special token ids come from the text tokenizer.
    """

    model_name_or_path: str | None = None
    tokenizer_name_or_path: str | None = None
    image_tokenizer_path: str | None = None
    dtype: str = "float32"
    image_rows_init: str = "mean"
    build: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataArguments:
    """Pre-tokenised data (``unimodal tokenize-dataset``) and how batches are built from it.

    Args:
        dataset_path: folder written by ``unimodal tokenize-dataset`` (``recipes/tokenize_dataset.py``).
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
class FinetuneArguments(RunArguments):
    """Training knobs, evaluation, sampling and export, on top of the shared `RunArguments`
    (output_dir, seed, mixed_precision, batch sizes, log/eval/save steps, keep_last, report_to,
    Hub upload).

    Steps are optimizer steps (``gradient_accumulation_steps`` micro-batches each); ``max_steps``
    > 0 wins over ``num_epochs``. Checkpoints go to ``output_dir/checkpoints``; relaunching the
    same command resumes from the latest. The final model goes to ``output_dir/final``.
    """

    output_dir: str = "runs/finetune"
    max_steps: int = 0
    num_epochs: float = 1.0
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # Step each parameter inside backward and free its gradient at once (no full gradient set:
    # 4 bytes per fp32 parameter less at the peak); one process, max_grad_norm 0, no accumulation.
    optimizer_in_backward: bool = False
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: each decoder MLP's backward recomputes this many tokens at a
    # time (unimodal.training.mlp_chunks: a layer's backward at the 0.5B shape, 4 x 1,100 tokens,
    # 675 -> 100 MB; same gradients); 0: off.
    mlp_chunk_size: int = MLP_CHUNK_SIZE
    # "chunked": the LM head runs only at positions that take a loss, a chunk of them at a time
    # (no [B, T, V] logits; unimodal.training.loss); "model": the model's own ``.loss``.
    loss: str = "chunked"
    loss_chunk_size: int | None = None  # positions per head call; None: sized to the vocabulary
    sample_prompts: list[str] = field(default_factory=list)
    # How those images are sampled; also saved as the model's own text-to-image settings in
    # final/generation_config.json (generate_images, the web demo, `unimodal generate` use them).
    sample_guidance_scale: float = 3.0
    sample_temperature: float = 1.0
    sample_top_k: int | None = None  # None or 0: no top-k
    sample_top_p: float = 1.0
    merge_lora: bool = True
