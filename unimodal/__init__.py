"""unimodal: Chameleon/Liquid-style unified multimodal LMs from any Hugging Face causal LM.

Image tokenizers are imported eagerly (that registers them with ``AutoConfig``/``AutoModel``);
everything else loads on first use so ``import unimodal`` stays cheap.
"""

from importlib import import_module

from .vq import *  # noqa: F401,F403  (registers the image tokenizers)
from .vq import __all__ as _vq_all

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "add_image_tokens": "unimodal.extend",
    "ImageVocabulary": "unimodal.vocab",
    "UnimodalProcessor": "unimodal.processor",
    "generate_images": "unimodal.generation",
    "generate_text": "unimodal.generation",
    "UnimodalPipeline": "unimodal.pipeline",
    "load_image_tokenizer": "unimodal.vq",
}

__all__ = [*_vq_all, *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unimodal' has no attribute {name!r}")
