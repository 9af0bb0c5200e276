"""The lecture's attempt 1: pixels as tokens (PixelRNN / PixelCNN / Image Transformer).

Each ``pixel_size x pixel_size`` block is averaged and replaced by the id of the nearest colour in a
palette of ``codebook_size`` entries. No learning beyond an optional k-means fit of the palette, so
the sequence is as long as the image has (pooled) pixels: the cost learned tokenizers avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel

from .base import ImageTokenizerMixin


class PixelTokenizerConfig(PretrainedConfig):
    """Palette tokenizer settings.

    Args:
        codebook_size: number of palette colours (tokens).
        image_size: side of the images the LM generates, in pixels.
        pixel_size: side of the pixel block one token stands for (the downsample factor).
        palette: optional ``codebook_size`` RGB triples in [-1, 1]; default is a grey ramp when
            ``grayscale`` else an even RGB lattice (then ``codebook_size`` must be a cube).
        grayscale: default palette of greys (digits, documents).
    """

    model_type = "unimodal_pixel_tokenizer"

    def __init__(
        self,
        codebook_size: int = 16,
        image_size: int = 8,
        pixel_size: int = 1,
        palette: list[list[float]] | None = None,
        grayscale: bool = True,
        **kwargs,
    ):
        self.codebook_size = codebook_size
        self.image_size = image_size
        self.pixel_size = pixel_size
        self.palette = palette
        self.grayscale = grayscale
        super().__init__(**kwargs)


def _default_palette(k: int, grayscale: bool) -> torch.Tensor:
    if grayscale:
        return torch.linspace(-1, 1, k).unsqueeze(1).repeat(1, 3)
    side = round(k ** (1 / 3))
    if side**3 != k:
        raise ValueError(f"an RGB lattice palette needs a cube codebook_size, got {k}; pass palette=")
    axis = torch.linspace(-1, 1, side)
    return torch.cartesian_prod(axis, axis, axis)


class PixelTokenizer(ImageTokenizerMixin, PreTrainedModel):
    """Pixel-level image tokenizer with the same ``encode``/``decode`` surface as `VQGAN`."""

    config_class = PixelTokenizerConfig
    base_model_prefix = "pixel_tokenizer"
    main_input_name = "pixel_values"

    def __init__(self, config: PixelTokenizerConfig):
        super().__init__(config)
        palette = (
            torch.tensor(config.palette, dtype=torch.float32)
            if config.palette is not None
            else _default_palette(config.codebook_size, config.grayscale)
        )
        if palette.shape != (config.codebook_size, 3):
            raise ValueError(f"palette must be [{config.codebook_size}, 3], got {tuple(palette.shape)}")
        # A frozen parameter (not a buffer) so save_pretrained writes it to safetensors.
        self.palette = torch.nn.Parameter(palette, requires_grad=False)  # [K, 3]
        self.post_init()

    def _init_weights(self, module):  # no learned weights
        pass

    @property
    def downsample_factor(self) -> int:
        return int(self.config.pixel_size)

    @torch.no_grad()
    def fit_palette(self, pixels: torch.Tensor, iters: int = 20, seed: int = 0) -> PixelTokenizer:
        """k-means the palette on ``pixels [N, 3, H, W]`` (in [-1, 1]); returns self."""
        colours = F.avg_pool2d(pixels.float(), self.downsample_factor).permute(0, 2, 3, 1).reshape(-1, 3)
        g = torch.Generator().manual_seed(seed)
        # k-means++ seeding: each new centre drawn with probability ~ squared distance.
        centres = colours[torch.randint(len(colours), (1,), generator=g)]
        for _ in range(self.codebook_size - 1):
            d2 = torch.cdist(colours, centres).min(1).values.pow(2)
            pick = torch.multinomial(d2 + 1e-12, 1, generator=g)
            centres = torch.cat([centres, colours[pick]])
        for _ in range(iters):
            assign = torch.cdist(colours, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, colours)
            counts = torch.bincount(assign, minlength=len(centres)).unsqueeze(1)
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        # Sort by brightness so ids are ordered (helps reading generated sequences).
        centres = centres[centres.sum(1).argsort()]
        self.palette.copy_(centres)
        return self

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """The palette, fp32 ``[K, 3]``."""
        return self.palette.float()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` in [-1, 1] -> ``codes LongTensor[B, H/f, W/f]``."""
        self.check_pixels(pixels)
        pooled = F.avg_pool2d(pixels.float(), self.downsample_factor)  # [B, 3, h, w]
        b, _, h, w = pooled.shape
        flat = pooled.permute(0, 2, 3, 1).reshape(-1, 3)  # [B*h*w, 3]
        return torch.cdist(flat, self.palette).argmin(1).view(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, h, w]`` -> ``pixels [B, 3, h*f, w*f]`` in [-1, 1]."""
        self.check_codes(codes)
        pixels = self.palette[codes].permute(0, 3, 1, 2)  # [B, 3, h, w]
        return F.interpolate(pixels, scale_factor=self.downsample_factor, mode="nearest")
