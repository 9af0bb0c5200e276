"""`UnimodalPipeline`: the extended LM and its processor, loaded from and saved to ONE folder.

Folder layout (what `save_pretrained` writes and `from_pretrained` reads, locally or from the Hub):

```
config.json, generation_config.json, model.safetensors   the LM: AutoModelForCausalLM loads it
                                                         (+ its sampling settings: set_sampling)
tokenizer.json, tokenizer_config.json, ...               the extended text tokenizer
processor_config.json                                    the UnimodalProcessor settings
image_tokenizer/config.json, model.safetensors           VQGAN or PixelTokenizer
```

Nothing custom is needed to load the LM: any serving stack that reads a causal-LM checkpoint can.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel

from .bases import base_for
from .extend import check_compatibility
from .generation import SamplingConfig, generate_images, generate_text, model_sampling, set_sampling
from .hub import PushToHubMixin, push_folder_to_hub
from .outputs import load_model, load_processor, resolve_output
from .processor import UnimodalProcessor


class UnimodalPipeline(PushToHubMixin):
    """Text-to-image, image-to-text and text-to-text with one unified LM.

    Args:
        model: a causal LM extended with `unimodal.add_image_tokens`.
        processor: its `UnimodalProcessor`.
    """

    hub_commit_message = "Upload UnimodalPipeline"

    def __init__(self, model: PreTrainedModel, processor: UnimodalProcessor):
        check_compatibility(model, processor)
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        token: str | None = None,
        **model_kwargs,
    ) -> UnimodalPipeline:
        """Load the LM, text tokenizer and image tokenizer from one folder or Hub repo.

        Args:
            path_or_repo: a folder written by `save_pretrained` or recipes/finetune.py (merged or
                LoRA adapter), a run folder holding it as ``final/``, a Hub repo id, or the folder
                of a unified base (Chameleon / Anole, Emu3, Janus; see docs/bases/).
            dtype: LM weights dtype (e.g. ``torch.bfloat16``: ~4.5x faster matmuls on CPUs with
                AVX-512 bf16); the image tokenizer stays float32.
            device: where both models go.
            revision, token: Hub revision and token.
            model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
        """
        hub: dict[str, Any] = {k: v for k, v in {"revision": revision, "token": token}.items() if v is not None}
        path_or_repo = resolve_output(path_or_repo)
        model = load_model(path_or_repo, dtype=dtype, **hub, **model_kwargs)
        processor = load_processor(path_or_repo, **hub)
        pipeline = cls(model.eval(), processor)
        return pipeline.to(device) if device is not None else pipeline

    def to(self, device: torch.device | str) -> UnimodalPipeline:
        """Move the LM and the image tokenizer to ``device``; returns self."""
        # PreTrainedModel.to is typed through functools.wraps, whose stub drops the method binding
        self.model.to(device)  # type: ignore[arg-type]
        self.processor.image_tokenizer.to(device)  # type: ignore[arg-type]
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write the folder described in the module docstring. With ``push_to_hub=True`` also
        upload it; ``repo_id`` (default: the folder name) and `push_to_hub` arguments in ``kwargs``."""
        save_directory = Path(save_directory)
        unified = base_for(self.model.config)
        if unified is not None:  # Chameleon / Emu3 / Janus: the model's own format
            unified.save_model(self.model, save_directory)
        else:
            self.model.save_pretrained(save_directory)
        self.processor.save_pretrained(save_directory)
        if push_to_hub:
            kwargs.setdefault("commit_message", self.hub_commit_message)
            push_folder_to_hub(save_directory, kwargs.pop("repo_id", save_directory.name), **kwargs)

    def sampling(self, task: str = "image") -> tuple[SamplingConfig, str]:
        """The settings `generate_images` (``task="image"``) or `generate_text` (``"text"``) use
        when given no ``preset``, and their source: ``"model"`` (this folder's
        ``generation_config.json``) or the preset it falls back to (``"preset liquid"``)."""
        return model_sampling(self.model, task)

    def set_sampling(self, sampling: str | SamplingConfig | None, task: str = "image") -> None:
        """Make ``sampling`` this model's default for ``task``; `save_pretrained` writes it with
        the model (``None`` removes it). See `unimodal.generation.set_sampling`."""
        set_sampling(self.model, sampling, task)

    def generate_images(
        self, prompts: str | Sequence[str], num_images_per_prompt: int = 1, **kwargs
    ) -> list[Image.Image]:
        """`unimodal.generate_images` with this pipeline's model and processor (by default with the
        model's own sampling settings, see `sampling`). Faster decoding: ``decoding="jacobi"``
        (``window=16``), ``static_cache=True``, ``compile=True``; see docs/generation.md."""
        return generate_images(self.model, self.processor, prompts, num_images_per_prompt, **kwargs)

    def generate_text(self, text: str | Sequence[str], images=None, **kwargs):
        """`unimodal.generate_text` with this pipeline's model and processor."""
        return generate_text(self.model, self.processor, text, images, **kwargs)
