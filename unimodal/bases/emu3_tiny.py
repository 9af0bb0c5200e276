"""Random Emu3 models built in-process (no downloads), for tests and benchmarks.

`emu3_tokenizer` makes a byte-level BPE tokenizer (`unimodal.offline.train_text_tokenizer`)
carrying Emu3's special tokens under their BAAI names and roles and ``codebook_size`` visual
tokens, added in a shuffled order so that code -> id is a real permutation of one id range (as
in any tokenizer whose visual-token strings do not sort like their numbers). `build_emu3` puts a
random ``Emu3ForConditionalGeneration`` and its `Emu3Processor` on it.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from .emu3_processor import (
    EOF_TOKEN,
    EOL_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_WRAPPER_TOKEN,
    VISUAL_TOKEN_TEMPLATE,
    Emu3Processor,
)

BOS, EOS, PAD = "<|extra_203|>", "<|extra_204|>", "<|endoftext|>"
# The tokenizer attributes transformers' Emu3Processor reads (``tokenizer.boi_token`` ...).
NAMED_TOKENS = {"image_token": "<image>", "boi_token": IMAGE_START_TOKEN, "eoi_token": IMAGE_END_TOKEN,
                "image_wrapper_token": IMAGE_WRAPPER_TOKEN, "eof_token": EOF_TOKEN}
# A tiny VQ model: 2 levels (8 x 8 pixel images -> 4 x 4 codes), one attention block.
TINY_VQ = dict(embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
               attn_resolutions=[1], hidden_size=64, temporal_downsample_factor=4)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)


def emu3_tokenizer(codebook_size: int = 64, seed: int = 0):
    """An Emu3-like fast tokenizer with ``codebook_size`` visual tokens (shuffled ids)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from ..offline import train_text_tokenizer

    backend = train_text_tokenizer(bos_token=BOS, eos_token=EOS, pad_token=PAD).backend_tokenizer
    codes = list(range(codebook_size))
    random.Random(seed).shuffle(codes)
    control = [EOL_TOKEN, EOF_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_WRAPPER_TOKEN, "<image>"]
    tokens = control + [VISUAL_TOKEN_TEMPLATE.format(c) for c in codes]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens=NAMED_TOKENS)


def build_emu3(codebook_size: int = 64, image_size: int = 8, seed: int = 0, vocab_size: int | None = None,
               dtype: torch.dtype = torch.float32, **text: Any):
    """``(model, processor)``: a random ``Emu3ForConditionalGeneration`` (eval mode) and its processor.

    Args:
        codebook_size: visual tokens (the VQ codebook).
        image_size: pixels per side; the tiny VQ halves it: ``(image_size / 2) ** 2`` codes per image.
        seed: weights and the visual-token order.
        vocab_size: embedding rows (default: the tokenizer's length; Emu3-Gen has 184622).
        dtype: the text model's dtype (the VQ model stays float32).
        text: `Emu3TextConfig` fields replacing `TINY_TEXT`'s.
    """
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    from ..vq.convert.emu3 import from_emu3

    tok = emu3_tokenizer(codebook_size, seed)
    text_config = {**TINY_TEXT, **text, "vocab_size": vocab_size or len(tok), "bos_token_id": tok.bos_token_id,
                   "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = Emu3Config(vq_config={**TINY_VQ, "codebook_size": codebook_size}, text_config=text_config,
                        vocabulary_map=tok.get_vocab())
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random VQ whose codes vary over an image (its init is near-degenerate)
        g = torch.Generator().manual_seed(seed)
        for p in model.model.vqmodel.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * (float(p.std()) if p.numel() > 1 else 1.0))
    model.model.text_model.to(dtype)
    model.lm_head.to(dtype)
    return model, Emu3Processor(tok, from_emu3(model, image_size=image_size).model)
