"""Janus's own VQ model (transformers' `JanusVQVAE`, LlamaGen-style) behind our image-tokenizer
surface (`unimodal.vq.base.ImageTokenizerMixin`): pixels ``[B, 3, H, W]`` in [-1, 1] <-> codes
``LongTensor[B, h, w]``.

Decoding is `JanusVQVAE.decode` unchanged (what `JanusForConditionalGeneration.decode_image_tokens`
runs). Encoding runs its encoder and ``quant_conv`` and then looks the latents up the way LlamaGen
and the original Janus release do: latents and codebook rows l2-normalised before the nearest-
neighbour search. transformers' ``JanusVQVAE.encode`` skips that normalisation (its decode does
normalise), so its codes differ wherever codebook rows are not unit length; ours equal our converted
`VQGAN` (`unimodal.vq.convert.from_janus`, tested) and the codes Janus was trained on.
"""

from __future__ import annotations

import os
from typing import cast

import torch
import torch.nn.functional as F
from transformers import JanusConfig, JanusVQVAE, JanusVQVAEConfig

from ..vq.base import ImageTokenizerMixin
from ..vq.convert.common import transformers_vq


class JanusImageTokenizer(ImageTokenizerMixin, JanusVQVAE):
    """`JanusVQVAE` with ``encode(pixels) -> codes [B, h, w]`` and ``decode(codes) -> pixels``.

    ``config.image_size`` (set here, not a `JanusVQVAEConfig` field) is ``num_patches * f``: 384 for
    Janus-Pro (24 x 24 codes at ``f = 16``). ``config.codebook_size`` mirrors ``num_embeddings``.
    """

    def __init__(self, config: JanusVQVAEConfig):
        super().__init__(config)
        # What the rest of unimodal reads off an image tokenizer's config.
        config.image_size = int(config.num_patches) * self.downsample_factor
        config.codebook_size = int(config.num_embeddings)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_multiplier) - 1)

    @property
    def grid_shape(self) -> tuple[int, int]:
        side = int(self.config.num_patches)
        return side, side

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] (``H = W = config.image_size``) -> codes ``[B, h, w]``."""
        self.check_pixels(pixels)
        latents = self.quant_conv(self.encoder(pixels))  # [B, D, h, w]
        b, d, h, w = latents.shape
        z = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, d).float(), dim=-1)  # [B*h*w, D]
        book = F.normalize(self.quantize.embedding.weight.float(), dim=-1)  # [K, D]
        # unit vectors: the nearest row is the one of largest dot product
        return (z @ book.T).argmax(-1).view(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w]`` -> pixels ``[B, 3, H, W]`` (about [-1, 1]), `JanusVQVAE.decode`."""
        self.check_codes(codes)
        return JanusVQVAE.decode(self, cast(torch.LongTensor, codes.flatten(1).to(self.device)))

    def code_vectors(self) -> torch.Tensor:
        """The l2-normalised codebook ``[K, D]`` fp32 (what decode looks codes up in)."""
        return F.normalize(self.quantize.embedding.weight.detach().float(), dim=-1)

    @classmethod
    def from_janus(cls, source: str | os.PathLike | torch.nn.Module) -> JanusImageTokenizer:
        """From a `JanusForConditionalGeneration` (module, folder or Hub repo: only its
        ``vqmodel.*`` tensors are read) or a saved `JanusVQVAE` / `JanusImageTokenizer` folder."""
        config, state_dict, _ = transformers_vq(source, JanusVQVAE, JanusConfig, JanusVQVAEConfig)
        tokenizer = cls(JanusVQVAEConfig.from_dict(config.to_dict()))
        tokenizer.load_state_dict(state_dict)
        return tokenizer.eval()
