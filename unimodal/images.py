"""Images in, pixels out: decoding, odd-mode conversion, centre crops and the [-1, 1] scaling.

Tensors are ``[B, 3, H, W]`` floats in ``[-1, 1]`` (the VQ-GAN convention). Every module that reads
an image (pre-tokenisation, tokenizer training data, the processor) goes through `open_image`,
`to_rgb`, `center_square` and `to_pixels` here, so they agree on what an image becomes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Background = tuple[int, int, int]


def to_rgb(image: Image.Image, background: Background = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Greyscale, palette (with or without transparency), CMYK and 16/32-bit integer or float modes
    are converted; alpha is composited over ``background`` instead of being dropped (dropping it
    turns transparent regions into whatever colour the encoder stored there, often black).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float greyscale: rescale by the dtype's range, not by PIL's clipping to 255.
        arr = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and arr.max() <= 1.0 else (65535.0 if arr.max() > 255 else 255.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source: Any, base_dir: str | os.PathLike | None = None) -> Image.Image:
    """Any stored form of an image -> a fully decoded RGB PIL image (raises on corrupt data).

    ``source`` is a path, encoded bytes, a ``datasets.Image(decode=False)`` value
    (``{"bytes": ..., "path": ...}``) or a PIL image. A relative path is resolved against
    ``base_dir`` when given (e.g. the folder of a ``.jsonl`` file that lists image paths).
    """
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, Image.Image):
        source.load()
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        source = Path(base_dir) / path if base_dir is not None and not path.is_absolute() else path
    else:
        raise ValueError(f"cannot read an image from a {type(source).__name__}")
    with Image.open(source) as image:
        image.load()  # decode now: a truncated file fails here, not later in a worker
        return to_rgb(image)


def center_square(width: int, height: int, scale: float = 1.0) -> tuple[int, int, int]:
    """``(left, top, side)`` of the centred square whose side is ``scale`` times the shorter side."""
    side = max(1, round(scale * min(width, height)))
    return (width - side) // 2, (height - side) // 2, side


def crop_resize(image: Image.Image, left: int, top: int, side: int, size: int,
                resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Cut the square ``(left, top, side)`` out of ``image`` and resize it to ``size x size``."""
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), resample)


def center_crop_resize(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Centre-crop to a square, then resize to ``size x size``."""
    return crop_resize(image, *center_square(*image.size), size, resample)


def center_crop_resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The same on pixels: ``[B, 3, H, W]`` -> ``[B, 3, size, size]``, antialiased bicubic resize.

    Tensors stay tensors (no round trip through 8-bit PIL), so pixels that are already
    ``size x size`` come back unchanged.
    """
    h, w = pixels.shape[-2:]
    left, top, side = center_square(w, h)
    pixels = pixels[..., top : top + side, left : left + side]
    if side == size:
        return pixels
    resized = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", antialias=True)
    return resized.clamp(-1, 1)  # bicubic overshoots at sharp edges


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``[3, H, W]`` float32 tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def pil_to_tensor(
    images: Image.Image | Sequence[Image.Image],
    size: int | None = None,
    resample: int = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """PIL image(s) -> ``[B, 3, H, W]`` in [-1, 1]; resized to ``size x size`` when given
    (centre-cropped to a square first so aspect ratio is kept)."""
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for image in images:
        image = to_rgb(image)
        if size is not None:
            image = center_crop_resize(image, size, resample)
        out.append(to_pixels(image))
    if len({tuple(t.shape) for t in out}) > 1:
        raise ValueError("images have different sizes; pass size= to resize them to one")
    return torch.stack(out)


def tensor_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [-1, 1] -> list of RGB PIL images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), mode="RGB") for a in arr]


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2,
              background: Background = (255, 255, 255)) -> Image.Image:
    """Tile images (all the same size) into one grid image, ``ncols`` per row."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    ncols = ncols or int(np.ceil(np.sqrt(len(images))))
    nrows = int(np.ceil(len(images) / ncols))
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), background)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(to_rgb(image), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
