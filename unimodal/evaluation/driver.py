"""Generate with a `UnimodalPipeline`, caption held-out images and score both: one call per model.

`evaluate_model` works on any labelled images whose classes prompts can name (the digits demo is
one example): it writes a class-by-sample grid and a reconstruction grid as PNGs and returns a
`ModelEvaluation` for `write_report`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..images import make_grid, tensor_to_pil
from .metrics import FeatureFn, as_pixels
from .scoring import ModelEvaluation, score_image_to_text, score_text_to_image, score_tokenizer


@torch.no_grad()
def caption_images(pipeline, images: Sequence[Image.Image], batch_size: int = 64,
                   max_new_tokens: int = 16) -> list[str]:
    """Greedy captions (image-to-text with an empty prompt) for ``images``, in batches."""
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        captions += pipeline.generate_text([""] * len(chunk), chunk, max_new_tokens=max_new_tokens)
    return [c.strip() for c in captions]


def evaluate_model(
    name: str,
    pipeline,
    prompts: Sequence[str],
    real_images: Sequence[Image.Image],
    real_labels: Sequence[int],
    classifier: FeatureFn,
    parse_caption: Callable[[str], int | None],
    out_dir: str | os.PathLike,
    *,
    feature_extractor: FeatureFn | None = None,
    samples_per_prompt: int = 20,
    grid_columns: int = 8,
    guidance_scale: float = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    ssim_sigma: float = 1.5,
    sequence_length: int = 0,
    display_size: int | None = None,
) -> ModelEvaluation:
    """Generate, caption and score one model; writes its PNGs into ``out_dir``.

    ``prompts[c]`` names class ``c``: each gets ``samples_per_prompt`` images, the first
    ``grid_columns`` of which go into ``<name>-text-to-image.png`` (one row per class). The real
    (held-out) images are captioned and are the reference for diversity and FID; the first 8
    with their reconstructions go into ``<name>-reconstructions.png``. ``display_size`` enlarges
    each image in those PNGs to that side (nearest neighbour, so pixels stay sharp).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = name.lower().replace(" ", "-")
    real_px = as_pixels(real_images)
    seconds = {}

    started = time.perf_counter()
    generated = pipeline.generate_images(
        list(prompts), samples_per_prompt, guidance_scale=guidance_scale, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size, progress=False)
    seconds["generate"] = time.perf_counter() - started
    prompt_labels = [c for c in range(len(prompts)) for _ in range(samples_per_prompt)]

    def grid(images: list[Image.Image], ncols: int) -> Image.Image:
        if display_size:
            images = [im.resize((display_size, display_size), Image.Resampling.NEAREST) for im in images]
        return make_grid(images, ncols=ncols)

    shown = [im for c in range(len(prompts)) for im in
             generated[c * samples_per_prompt: c * samples_per_prompt + min(grid_columns, samples_per_prompt)]]
    grid(shown, min(grid_columns, samples_per_prompt)).save(out / f"{slug}-text-to-image.png")

    started = time.perf_counter()
    captions = caption_images(pipeline, list(real_images), batch_size)
    seconds["caption"] = time.perf_counter() - started

    tokenizer = pipeline.processor.image_tokenizer
    first = real_px[:8]
    _, recon = tokenizer.reconstruct(first)  # [8, 3, H, W]
    grid(tensor_to_pil(torch.cat([first, recon])), len(first)).save(out / f"{slug}-reconstructions.png")

    return ModelEvaluation(
        name=name,
        sequence_length=sequence_length,
        tokenizer=score_tokenizer(tokenizer, real_px, real_labels, classifier, feature_extractor, ssim_sigma),
        text_to_image=score_text_to_image(generated, prompt_labels, real_px, real_labels, classifier,
                                          feature_extractor),
        image_to_text=score_image_to_text(captions, real_labels, parse_caption),
        seconds=seconds,
        images={"text-to-image": f"{slug}-text-to-image.png", "reconstructions": f"{slug}-reconstructions.png"},
    )
