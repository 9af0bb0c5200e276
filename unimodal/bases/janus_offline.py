"""Random Janus models and a tokenizer with Janus's special tokens, built in-process (no download):
what the tests and ``benchmarks/base_janus.py`` run on.

`janus_config` has two shapes: ``"tiny"`` (a 2-layer 32-wide LM, a 4 x 4 code grid of 64 codes, a
one-block VQ) and ``"pro-1b"``: Janus-Pro-1B's language model and generation path (hidden 2048,
16 heads, 102400 text rows, 16384 codes, 24 x 24 = 576 image tokens) with ``layers`` of its 24
layers and a small SigLIP / VQ encoder (neither runs while generating image tokens).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig, PreTrainedTokenizerFast

from .janus_model import JanusImageLM
from .janus_processor import BOI_TOKEN, EOI_TOKEN, JanusProcessor
from .janus_vq import JanusImageTokenizer

# Janus-Pro's own names for its control tokens (DeepSeek tokenizer)
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"


def janus_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with Janus's bos/eos/pad and image tokens as special tokens
    (`tokenizer.boi_token`, ``eoi_token``, ``image_token`` as in Janus's tokenizer config)."""
    from ..offline import train_text_tokenizer

    tok = train_text_tokenizer(vocab_size=vocab_size, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.add_special_tokens({"additional_special_tokens": [BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN]})
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, extra_special_tokens={"boi_token": BOI_TOKEN,
                                                                        "eoi_token": EOI_TOKEN,
                                                                        "image_token": IMAGE_TOKEN})


def janus_config(tokenizer: PreTrainedTokenizerFast, shape: str = "tiny", layers: int | None = None,
                 text_vocab_size: int | None = None, grid: int | None = None) -> JanusConfig:
    """A `JanusConfig` of ``shape`` (``"tiny"`` or ``"pro-1b"``) whose special ids are the tokenizer's.

    ``text_vocab_size``: rows of the text embedding (default: the tokenizer's length for "tiny",
    Janus-Pro's 102400 for "pro-1b"); ``layers``: LM layers (default 2 / 24); ``grid``: side of
    the code grid (default 4 / 24: ``grid ** 2`` image tokens).
    """
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if shape == "tiny":
        hidden, heads, inter, n_layers, vocab, codes, grid_default = 32, 4, 64, 2, len(tokenizer), 64, 4
    elif shape == "pro-1b":
        hidden, heads, inter, n_layers, vocab, codes, grid_default = 2048, 16, 5632, 24, 102400, 16384, 24
    else:
        raise ValueError(f"shape must be 'tiny' or 'pro-1b', got {shape!r}")
    grid = grid or grid_default
    text = LlamaConfig(vocab_size=text_vocab_size or vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers or n_layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=16384 if shape != "tiny" else 256,
                       tie_word_embeddings=False, **ids)
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=4 * grid,
                               patch_size=4, projection_dim=hidden, num_image_tokens=grid * grid, mlp_ratio=2)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=codes, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=hidden,
                          image_token_embed_dim=hidden, num_hidden_layers=2)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=cast(int, image_token),
                       tie_word_embeddings=False)


def build_janus(tokenizer: PreTrainedTokenizerFast | None = None, shape: str = "tiny", seed: int = 0,
                layers: int | None = None, dtype: torch.dtype = torch.float32,
                grid: int | None = None) -> tuple[JanusImageLM, JanusProcessor]:
    """A random `JanusImageLM` (eval mode, generation config as Janus-Pro's: guidance 5, the
    image-start id in ``generation_kwargs``) and its `JanusProcessor`."""
    tokenizer = tokenizer or janus_tokenizer()
    config = janus_config(tokenizer, shape, layers, grid=grid)
    torch.manual_seed(seed)
    model = cast(JanusImageLM, cast(Any, JanusImageLM(config)).to(dtype).eval())
    boi = tokenizer.convert_tokens_to_ids(BOI_TOKEN)
    gen = model.generation_config
    text = cast(Any, config.text_config)
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = text.bos_token_id, text.eos_token_id, text.pad_token_id
    gen.generation_kwargs = {"boi_token_id": boi}  # type: ignore[attr-defined]  # Janus's generate reads it
    gen.guidance_scale = 5.0
    processor = JanusProcessor(tokenizer, JanusImageTokenizer.from_janus(model),
                               text_vocab_size=text.vocab_size)
    return model, processor
