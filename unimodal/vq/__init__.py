"""Image tokenizers: the learned VQ-GAN and the pixel-level baseline.

Importing this package registers both with ``AutoConfig`` / ``AutoModel`` so that a saved folder
loads with ``AutoModel.from_pretrained`` after ``import unimodal``.
"""

from __future__ import annotations

import os

from transformers import AutoConfig, AutoModel

from .base import ImageTokenizerMixin
from .config import VQGANConfig
from .model import VQGAN, VQGANOutput
from .pixel import PixelTokenizer, PixelTokenizerConfig

AutoConfig.register(PixelTokenizerConfig.model_type, PixelTokenizerConfig)
AutoModel.register(PixelTokenizerConfig, PixelTokenizer)
AutoConfig.register(VQGANConfig.model_type, VQGANConfig)
AutoModel.register(VQGANConfig, VQGAN)

__all__ = ["ImageTokenizerMixin", "PixelTokenizer", "PixelTokenizerConfig", "VQGAN", "VQGANConfig", "VQGANOutput"]


def load_image_tokenizer(path: str | os.PathLike, **kwargs) -> ImageTokenizerMixin:
    """Load any unimodal image tokenizer (`VQGAN`, `PixelTokenizer`) from a folder or Hub repo.

    ``kwargs`` go to ``AutoModel.from_pretrained`` (e.g. ``subfolder="vqgan"``, ``dtype=``).
    Raises ``TypeError`` when ``path`` holds some other model, e.g. the LM of a pipeline folder.
    """
    model = AutoModel.from_pretrained(path, **kwargs)
    if not isinstance(model, ImageTokenizerMixin):
        raise TypeError(
            f"{os.fspath(path)!r} holds a {type(model).__name__} (model_type "
            f"{model.config.model_type!r}), not an image tokenizer; point to the folder (or pass "
            f"subfolder=) that holds the VQ-GAN / pixel tokenizer config"
        )
    return model
