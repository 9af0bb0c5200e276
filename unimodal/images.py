"""Image <-> tensor conversion with the awkward modes real data sets contain.

Tensors are ``[B, 3, H, W]`` floats in ``[-1, 1]`` (the VQ-GAN convention).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
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


def pil_to_tensor(
    images: Image.Image | Sequence[Image.Image],
    size: int | None = None,
    resample: int = Image.BICUBIC,
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
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    if len({tuple(t.shape) for t in out}) > 1:
        raise ValueError("images have different sizes; pass size= to resize them to one")
    return torch.stack(out)


def center_crop_resize(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Centre-crop to a square, then resize to ``size x size``."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), resample)


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
