"""What every image tokenizer in unimodal offers, so the vocabulary, data and generation code
works the same on a learned VQ-GAN and on the pixel-level baseline.

An image tokenizer maps pixels ``[B, 3, H, W]`` in ``[-1, 1]`` to codes ``LongTensor[B, h, w]``
with ``h = H / downsample_factor`` and back. Its config carries ``codebook_size`` and
``image_size`` (the training resolution, which fixes the ``h * w`` tokens of a generated image).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    # Every image tokenizer is also a `transformers.PreTrainedModel` (``class VQGAN(
    # ImageTokenizerMixin, PreTrainedModel)``): to the type checker the mixin derives from it, so
    # code typed against the mixin can use ``config``, ``device``, ``to``, ``save_pretrained``...
    from transformers import PreTrainedModel as _TokenizerBase
else:
    _TokenizerBase = object


class ImageTokenizerMixin(_TokenizerBase):
    """Shared shape logic and input checks for `VQGAN` and `PixelTokenizer`."""

    @property
    def downsample_factor(self) -> int:  # pragma: no cover - each tokenizer defines it
        raise NotImplementedError

    @property
    def codebook_size(self) -> int:
        return int(self.config.codebook_size)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(h, w)`` of the code grid for an image of ``config.image_size`` pixels."""
        side = int(self.config.image_size) // self.downsample_factor
        return side, side

    @property
    def num_image_tokens(self) -> int:
        h, w = self.grid_shape
        return h * w

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - each tokenizer defines it
        """Pixels ``[B, 3, H, W]`` in ``[-1, 1]`` -> codes ``LongTensor[B, h, w]``."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - each tokenizer defines it
        """Codes ``LongTensor[B, h, w]`` -> pixels ``[B, 3, H, W]`` in ``[-1, 1]``."""
        raise NotImplementedError

    def code_vectors(self) -> torch.Tensor:  # pragma: no cover - each tokenizer defines it
        """What each code stands for, fp32 ``[K, D]``: similar images -> nearby vectors. Used to
        give the LM's image-token embeddings the codebook's geometry (`add_image_tokens`)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and decode ``pixels [N, 3, H, W]`` in batches on this tokenizer's device.

        Returns the codes ``LongTensor[N, h, w]`` and the reconstructions ``[N, 3, H, W]`` (float32),
        both on the CPU: what every quality measure and sample grid of a tokenizer is made from.
        Runs under the caller's autocast, if any.
        """
        codes, recon = [], []
        for batch in pixels.split(batch_size):
            c = self.encode(batch.to(device=self.device, dtype=self.dtype))  # [b, h, w]
            codes.append(c.cpu())
            recon.append(self.decode(c).float().cpu())  # [b, 3, H, W]
        return torch.cat(codes), torch.cat(recon)

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Raise a clear ``ValueError`` unless ``pixels`` is ``[B, 3, H, W]`` with H, W divisible."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels.shape)}")
        f = self.downsample_factor
        h, w = pixels.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the downsample factor {f}; "
                f"resize or crop to a multiple of {f} (e.g. {max(f, h // f * f)}x{max(f, w // f * f)})"
            )

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise a clear ``ValueError`` unless ``codes`` is an integer ``[B, h, w]`` grid in range."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.ndim != 3:
            raise ValueError(f"expected codes of shape [B, h, w], got {tuple(codes.shape)}")
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"code {int(codes[pos])} at position {pos} is outside [0, {self.codebook_size})"
            )
