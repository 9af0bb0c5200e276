"""Generation with a unified text+image LM: text-to-image with batched classifier-free guidance,
image-to-text / text-to-text, and interleaved output. See docs/generation.md.

- `generate_images`: prompts -> PIL images (`sample_image_tokens` + `decode_image_ids`).
- `generate_text`: prompts (+ images) -> text, or text/image segments with ``allow_images``.
- `SamplingConfig`, `PRESETS`: sampling settings; ``"liquid"`` is the Liquid demo's.
- `model_sampling`, `set_sampling`: the settings a model carries in its ``generation_config.json``.
- `TokenSampler`, `RowUniforms`: batched, per-row reproducible sampling.
- `ImageSpanConstraint`: a transformers logits processor keeping image spans well formed.
- `KVDecoder`: left-padded incremental decoding on a KV cache; `StaticKVDecoder`: on a static
  cache, with a compiled decode step.
- `JacobiDecoding`: speculative Jacobi decoding (``decoding="jacobi"``); `DecodeStats`: counters.
"""

from .decoder import KVDecoder
from .images import DECODINGS, decode_image_ids, generate_images, sample_image_tokens
from .jacobi import DecodeStats, JacobiDecoding
from .sampling import (
    PRESETS,
    ImageSpanConstraint,
    RowUniforms,
    SamplingConfig,
    TokenSampler,
    in_top_k_top_p,
    model_sampling,
    resolve_sampling,
    set_sampling,
)
from .static import StaticKVDecoder
from .text import generate_text

__all__ = [
    "DECODINGS", "DecodeStats", "JacobiDecoding", "StaticKVDecoder",
    "PRESETS", "ImageSpanConstraint", "KVDecoder", "RowUniforms", "SamplingConfig", "TokenSampler",
    "decode_image_ids", "generate_images", "generate_text", "in_top_k_top_p", "model_sampling",
    "resolve_sampling", "sample_image_tokens", "set_sampling",
]
