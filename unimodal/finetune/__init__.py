"""What only fine-tuning needs; `unimodal.recipes.finetune` strings these together.

- `args`: the recipe's typed config (`ModelArguments`, `DataArguments`, `FinetuneArguments`;
  LoRA's `LoraArguments` in `lora`).
- `model`: `load_model_and_processor` (a hub/local LM, one built from a config, or an extended folder),
  `prepare_model` (that, with gradient checkpointing and LoRA as the recipe asks).
- `data`: `load_data_processor`, `load_task_data` (checked, mixed by task, held-out split per task).
- `evaluate`: held-out loss per task, `save_samples` (an image grid from fixed prompts).
- `lora`: `apply_lora` with the new token rows trained, `frozen_new_rows`.

Extending and checking the LM are in `unimodal.extend`, the output folder in `unimodal.outputs`.
"""

from .args import DataArguments, FinetuneArguments, ModelArguments
from .data import load_data_processor, load_task_data
from .evaluate import evaluate, save_samples
from .lora import LoraArguments, apply_lora, frozen_new_rows
from .model import is_extended, load_model_and_processor, prepare_model

__all__ = [
    "DataArguments", "FinetuneArguments", "LoraArguments", "ModelArguments", "apply_lora", "evaluate",
    "frozen_new_rows", "is_extended", "load_data_processor", "load_model_and_processor", "load_task_data",
    "prepare_model", "save_samples",
]
