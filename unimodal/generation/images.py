"""Text-to-image sampling: batched classifier-free guidance on one KV cache, image span constrained.

Per step, conditional and unconditional rows go through ONE forward pass (``[2B, 1]`` new tokens
on a shared cache), with logits computed for the image ids only (the prompt ends in ``<boi>``, so
the next ``h*w`` tokens can only be image ids and ``<eoi>`` follows). transformers' own CFG
(``guidance_scale`` + negative prompt in ``generate``) runs a second, unbatched forward with its
own cache instead; ``benchmarks/generate.py`` compares the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .decoder import KVDecoder
from .global_rng import RNGS, GlobalDraws, draw_layout
from .jacobi import DecodeStats, JacobiDecoding
from .sampling import RowUniforms, SamplingConfig, TokenSampler, model_sampling, resolve_sampling
from .static import StaticKVDecoder

DECODINGS = ("token", "jacobi")


def _decoding(decoding: str | JacobiDecoding, window: int | None) -> JacobiDecoding | None:
    """``"token"`` -> ``None``; ``"jacobi"`` (with ``window``) or a `JacobiDecoding` -> that."""
    if isinstance(decoding, JacobiDecoding):
        return decoding
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    if decoding == "token":
        return None
    return JacobiDecoding() if window is None else JacobiDecoding(window)


@torch.no_grad()
def sample_image_tokens(
    model,
    processor,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    negative_prompt_ids: Sequence[int] | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    decoding: str | JacobiDecoding = "token",
    window: int | None = None,
    static_cache: bool = False,
    compile: bool | str = False,
    stats: DecodeStats | None = None,
    rng: str = "row",
) -> torch.Tensor:
    """Sample one image span per prompt row; returns image ids ``[N, h*w]`` (without <boi>/<eoi>).

    Args:
        model: a causal LM extended with `add_image_tokens`.
        processor: its `UnimodalProcessor`.
        prompt_ids: one id list per output image, each ending in ``<boi>``
            (`UnimodalProcessor.text_to_image_ids(caption)`).
        sampling: guidance, temperature, top-k, top-p (see `SamplingConfig`).
        negative_prompt_ids: the unconditional branch; default
            `UnimodalProcessor.unconditional_prompt_ids` (the form condition dropout trained), or
            per row ``processor.unconditional_ids_for(row)`` where the processor has it.
        seed, generator: one random stream per row (see `RowUniforms`): results per row do not
            depend on the batch they were made in.
        batch_size: rows per forward (doubled with guidance); ``None``: all at once.
        progress: show a progress bar.
        decoding: ``"token"`` (one forward pass per token) or ``"jacobi"``: speculative Jacobi
            decoding, ``window`` drafts verified per pass (default 16; see
            `unimodal.generation.jacobi`), the same distribution (the same tokens when greedy);
            or a `JacobiDecoding`.
        static_cache: preallocate the KV cache (`transformers.StaticCache`); implied by ``compile``.
        compile: compile the one-token decode step with `torch.compile` (``True``: inductor on a
            CPU, CUDA graphs on a GPU; or a backend name); falls back to eager with one warning.
            The first call per model and batch shape compiles (``stats.compile_seconds``).
        stats: a `DecodeStats` to add forward passes, tokens, drafts and compile time to.
        rng: ``"row"`` (default): one random stream per row, as above. ``"global"``: draw each
            step's ids for the batch with one ``torch.multinomial`` on torch's global generator
            (after ``torch.manual_seed(seed)`` when ``seed`` is an int), as transformers'
            ``generate`` does, so the ids equal the model's own ``generate`` with the same seed and
            settings (see `unimodal.generation.global_rng`; one ``generate`` call is one batch:
            keep ``batch_size=None``). Only with ``decoding="token"``.
    """
    jacobi = _decoding(decoding, window)
    if rng not in RNGS:
        raise ValueError(f"rng must be one of {RNGS}, got {rng!r}")
    global_rng = rng == "global" and sampling.do_sample
    if global_rng:
        if jacobi is not None or generator is not None or not (seed is None or isinstance(seed, int)):
            raise ValueError("rng='global' takes one int seed (or none: the global generator as it is) "
                             "and decoding='token'")
        if seed is not None:
            torch.manual_seed(seed)
    for i, row in enumerate(prompt_ids):
        if not row or row[-1] != processor.boi_token_id:
            raise ValueError(f"prompt {i} must end with <boi> (id {processor.boi_token_id}); "
                             "build it with processor.text_to_image_ids(caption)")
    n_rows, n_tokens = len(prompt_ids), processor.num_image_tokens
    lo, hi = processor.image_token_range
    guided = sampling.guidance_scale > 1
    uncond = list(negative_prompt_ids or processor.unconditional_prompt_ids())
    # A base whose own generate builds each row's unconditional branch from that row (Janus: the
    # prompt with its caption padded out) says so with unconditional_ids_for(row).
    per_row = getattr(processor, "unconditional_ids_for", None) if negative_prompt_ids is None else None
    steps = n_tokens if jacobi is None else jacobi.uniform_steps(n_tokens)
    uniforms = RowUniforms(n_rows, steps, seed, generator) if sampling.do_sample and not global_rng else None
    sampler = TokenSampler(sampling)  # guidance: logits [2B, K] (cond rows, uncond rows) -> [B, K]
    draw = GlobalDraws(sampler, draw_layout(model, processor)) if global_rng else sampler
    batch_size = batch_size or n_rows
    out = torch.empty(n_rows, n_tokens, dtype=torch.long)
    bar = tqdm(total=n_rows * n_tokens, desc="image tokens", unit="tok", disable=not progress)
    for start in range(0, n_rows, batch_size):
        stop = min(start + batch_size, n_rows)
        rows = list(prompt_ids[start:stop])
        uncond_rows = [per_row(list(r)) for r in rows] if per_row is not None else [uncond] * len(rows)
        batch = processor.pad(rows + uncond_rows if guided else rows, padding_side="left")
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [R, L], R = B or 2B
        extra = 1 if jacobi is None else jacobi.window + 1  # the widest pass past the span
        decoder = _decoder(model, processor, (lo, hi), ids.shape[1] + n_tokens + extra, static_cache, compile,
                           stats)
        if jacobi is not None:
            u = None if uniforms is None else uniforms.rows(start, stop, decoder.device)
            codes = jacobi.sample(decoder, sampler, ids, mask, n_tokens, u, stats)
            bar.update((stop - start) * n_tokens)
            out[start:stop] = codes.cpu() + lo
            continue
        logits = decoder.prefill(ids, mask)  # [R, K] logits of the K image ids, R = B or 2B
        u = None if uniforms is None else uniforms.rows(start, stop, logits.device)  # [B, h*w, 2]
        codes = torch.empty(stop - start, n_tokens, dtype=torch.long, device=logits.device)
        for t in range(n_tokens):
            codes[:, t] = draw(codes[:, :t], logits, None if u is None else u[:, t])
            if t + 1 < n_tokens:  # the uncond rows continue with the same image tokens
                step = codes[:, t] + lo
                logits = decoder.step(torch.cat([step, step]) if guided else step)
            bar.update(stop - start)
        if stats is not None:
            stats.forward_passes += n_tokens  # the prefill and n - 1 steps
            stats.tokens += (stop - start) * n_tokens
        out[start:stop] = codes.cpu() + lo
    bar.close()
    return out


def _decoder(model, processor, vocab_slice: tuple[int, int], max_length: int, static_cache: bool,
             compile: bool | str, stats: DecodeStats | None) -> KVDecoder:
    """The decoder giving logits ``[R, K]`` of the image ids: the processor's own
    (``processor.image_decoder(...)``, a unified base whose model needs another forward), else a
    `StaticKVDecoder` (static cache / compile) or a `KVDecoder`."""
    hook = getattr(processor, "image_decoder", None)
    if hook is not None:
        return hook(model, vocab_slice, max_length, static_cache or bool(compile), compile, stats)
    if static_cache or compile:
        return StaticKVDecoder(model, vocab_slice, max_length, compile, stats)
    return KVDecoder(model, vocab_slice=vocab_slice)


def decode_image_ids(processor, image_ids: torch.Tensor) -> list[Image.Image]:
    """Image ids ``[N, h*w]`` -> N PIL images in one batched image-tokenizer decode.

    Goes through `UnimodalProcessor.batch_decode(strict=True)`, so a wrong length or a non-image
    id raises a ``ValueError`` naming its position; a processor with its own
    ``decode_image_ids(ids [N, h*w]) -> list[PIL]`` (a unified base whose span format differs)
    decodes instead.
    """
    hook = getattr(processor, "decode_image_ids", None)
    if hook is not None:
        return list(hook(torch.as_tensor(image_ids).view(len(image_ids), -1)))
    boi, eoi = processor.boi_token_id, processor.eoi_token_id
    spans = [[boi, *row.tolist(), eoi] for row in torch.as_tensor(image_ids).view(len(image_ids), -1)]
    decoded = processor.batch_decode(spans, strict=True)
    return [segments[0] for segments in decoded]


def generate_images(
    model,
    processor,
    prompts: str | Sequence[str],
    num_images_per_prompt: int = 1,
    *,
    preset: str | SamplingConfig | None = None,
    guidance_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool | None = None,
    negative_prompt: str | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    decoding: str = "token",
    window: int | None = None,
    static_cache: bool = False,
    compile: bool | str = False,
    rng: str = "row",
) -> list[Image.Image]:
    """Generate images from text prompts with batched classifier-free guidance.

    Args:
        model: a causal LM extended with `unimodal.add_image_tokens` (any dtype/device).
        processor: its `UnimodalProcessor`.
        prompts: one caption or a list; output images are ordered prompt by prompt,
            ``num_images_per_prompt`` each.
        preset: the settings to start from: ``None`` (default) the model's own
            (``generation_config.json``, see `model_sampling`), or the ``"liquid"`` preset
            (guidance 7, temperature 0.9, top-k 4096, top-p 0.99) when it has none; a name from
            `unimodal.generation.PRESETS`; or a `SamplingConfig`. The explicit arguments below
            override it.
        guidance_scale, temperature, top_k, top_p, do_sample: see `SamplingConfig`.
        negative_prompt: caption for the unconditional branch instead of the empty caption.
        seed: ``int`` (image ``i`` uses ``seed + i``, so it is reproduced alone with ``seed + i``),
            or one seed per image. ``generator``: one ``torch.Generator`` or one per image.
        batch_size: images per forward pass (``None``: all).
        progress: show a progress bar.
        decoding, window: ``"token"`` (default) or ``"jacobi"`` (speculative Jacobi decoding with
            ``window`` drafts per pass: fewer forward passes, the same distribution).
        static_cache, compile: a static KV cache, and a compiled decode step (see
            `sample_image_tokens`).
        rng: ``"row"`` (per-row streams) or ``"global"`` (transformers' ``generate``'s draws: the
            same ids as the model's own ``generate`` with the same seed; see `sample_image_tokens`).

    Returns:
        ``len(prompts) * num_images_per_prompt`` RGB images.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if preset is None:
        preset, _ = model_sampling(model, "image")
    sampling = resolve_sampling(preset, guidance_scale=guidance_scale, temperature=temperature,
                                top_k=top_k, top_p=top_p, do_sample=do_sample)
    rows = [processor.text_to_image_ids(p) for p in prompts for _ in range(num_images_per_prompt)]
    negative = None if negative_prompt is None else processor.text_to_image_ids(negative_prompt)
    ids = sample_image_tokens(model, processor, rows, sampling, negative_prompt_ids=negative, seed=seed,
                              generator=generator, batch_size=batch_size, progress=progress, decoding=decoding,
                              window=window, static_cache=static_cache, compile=compile, rng=rng)
    return decode_image_ids(processor, ids)
