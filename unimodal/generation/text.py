"""Text (and, when allowed, interleaved text+image) generation: captioning, chat, continuation.

Image ids are masked out of text generation unless ``allow_images=True``; then a ``<boi>`` opens a
constrained span of exactly ``h*w`` image ids and ``<eoi>``, after which text resumes
(`ImageSpanConstraint`). The result is decoded by `UnimodalProcessor.batch_decode`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .decoder import KVDecoder
from .sampling import ImageSpanConstraint, RowUniforms, SamplingConfig, TokenSampler, model_sampling, resolve_sampling

Segment = str | Image.Image


def _prompt_batch(processor, texts: list[str], images) -> dict[str, torch.Tensor]:
    """Left-padded prompts. Images without any ``<image>`` placeholder in the texts go first, one
    per text: ``<bos> <boi> ids <eoi> text`` (the image-to-text training format)."""
    placeholder = processor.image_placeholder
    if images is not None and not any(placeholder in t for t in texts):
        count = 1 if isinstance(images, Image.Image) else len(images)
        if count != len(texts):
            raise ValueError(f"{count} images for {len(texts)} texts: pass one image per text, or put "
                             f"{placeholder} placeholders in the texts where the images go")
        texts = [placeholder + t for t in texts]
    return processor(texts, images, padding_side="left", return_tensors="pt")


@torch.no_grad()
def generate_text(
    model,
    processor,
    text: str | Sequence[str],
    images: Image.Image | Sequence[Image.Image] | torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    allow_images: bool = False,
    preset: str | SamplingConfig | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    progress: bool = False,
) -> str | list[Segment] | list[str] | list[list[Segment]]:
    """Continue text prompts, optionally about images (captioning, visual questions, chat).

    Args:
        model, processor: an LM extended with `add_image_tokens` and its `UnimodalProcessor`.
        text: one prompt or a batch; ``<image>`` marks where an image goes. With ``images`` and no
            placeholder, each text gets its image in front (``""`` = plain captioning).
        images: the images for the placeholders, in reading order across the batch.
        max_new_tokens: generated tokens per row at most (stops early at ``<eos>``).
        allow_images: let the model open image spans (interleaved output); else image ids,
            ``<boi>`` and ``<eoi>`` can never be sampled.
        preset: ``None`` (default): the model's text settings (`model_sampling`), else
            ``"greedy"``; or ``"greedy"``, ``"plain"``, a `SamplingConfig`. Giving
            ``temperature``, ``top_k`` or ``top_p`` switches sampling on unless ``do_sample=False``.
        seed, generator: one random stream per row (see `RowUniforms`).
        progress: show a progress bar.

    Returns:
        For a single prompt a ``str`` (or, with ``allow_images``, a list of ``str`` / ``PIL.Image``
        segments); for a list of prompts a list of those.
    """
    texts = [text] if isinstance(text, str) else list(text)
    if preset is None:
        preset, _ = model_sampling(model, "text")
    sampling = resolve_sampling(preset, temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample)
    if sampling.guidance_scale != 1:
        raise ValueError("guidance applies to generate_images; generate_text samples with guidance_scale=1")

    batch = _prompt_batch(processor, texts, images)
    prompt, prompt_len = batch["input_ids"], batch["input_ids"].shape[1]
    constraint = ImageSpanConstraint.from_processor(processor, allow_images=allow_images,
                                                    max_length=prompt_len + max_new_tokens)
    uniforms = RowUniforms(len(texts), max_new_tokens, seed, generator) if sampling.do_sample else None
    decoder = KVDecoder(model)
    logits = decoder.prefill(prompt, batch["attention_mask"])  # [B, V]
    sampler = TokenSampler(sampling)
    u = None if uniforms is None else uniforms.rows(0, len(texts), logits.device)  # [B, max_new_tokens, 2]
    sequence = prompt.to(logits.device)  # [B, L + t]: the constraint reads span state from it
    done = torch.zeros(len(texts), dtype=torch.bool, device=logits.device)
    for t in tqdm(range(max_new_tokens), desc="tokens", disable=not progress):
        next_ids = sampler(sequence, constraint(sequence, logits), None if u is None else u[:, t])
        next_ids = next_ids.masked_fill(done, processor.pad_token_id)  # finished rows just pad
        sequence = torch.cat([sequence, next_ids[:, None]], dim=1)
        done |= next_ids == processor.eos_token_id
        if done.all() or t + 1 == max_new_tokens:
            break
        logits = decoder.step(next_ids)

    rows = []
    for generated in sequence[:, prompt_len:].cpu():
        eos = (generated == processor.eos_token_id).nonzero()
        rows.append(generated[: int(eos[0])] if len(eos) else generated)
    decoded = processor.batch_decode(rows, strict=True)
    results = decoded if allow_images else ["".join(segments) for segments in decoded]
    return results[0] if isinstance(text, str) else results
