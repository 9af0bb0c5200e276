"""Image tokenizers: the learned VQ-GAN and the pixel-level baseline.

Importing this package registers both with ``AutoConfig`` / ``AutoModel`` so that a saved folder
loads with ``AutoModel.from_pretrained`` after ``import unimodal``.
"""

from transformers import AutoConfig, AutoModel

from .base import ImageTokenizerMixin
from .pixel import PixelTokenizer, PixelTokenizerConfig

AutoConfig.register(PixelTokenizerConfig.model_type, PixelTokenizerConfig)
AutoModel.register(PixelTokenizerConfig, PixelTokenizer)

__all__ = ["ImageTokenizerMixin", "PixelTokenizer", "PixelTokenizerConfig"]
