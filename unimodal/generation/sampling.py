"""Sampling settings, per-row random streams and the image-span constraint.

transformers already has the pieces that reshape a distribution (temperature, top-k, top-p,
batched classifier-free guidance); we use them as they are. What they lack for a unified
text+image LM is written here:

- `RowUniforms`: one random stream per output row, so row ``i`` samples the same tokens whatever
  else is in the batch (``torch.multinomial`` on a batch draws from one shared stream);
- `sample_tokens`: inverse-CDF sampling that consumes exactly one uniform per row and step;
- `ImageSpanConstraint`: after ``<boi>`` only image ids, exactly ``h*w`` of them, then ``<eoi>``;
  outside a span no image ids (and ``<boi>`` only when interleaved output is allowed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Args:
        guidance_scale: classifier-free guidance weight ``s`` in ``uncond + s * (cond - uncond)``;
            1 turns guidance off (and skips the unconditional forward rows).
        temperature: divides the (guided) logits.
        top_k: keep the ``k`` most likely ids (``None`` or 0: all).
        top_p: keep the smallest set of ids with probability mass ``>= top_p`` (1: all).
        do_sample: sample; ``False`` takes the argmax (temperature/top-k/top-p then do nothing).
    """

    guidance_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    do_sample: bool = True

    def __post_init__(self):
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; for greedy use do_sample=False")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no top-k), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


PRESETS: dict[str, SamplingConfig] = {
    # Liquid's demo (text-to-image tab).
    "liquid": SamplingConfig(guidance_scale=7.0, temperature=0.9, top_k=4096, top_p=0.99),
    # Ancestral sampling from the conditional model: what the LM itself believes.
    "plain": SamplingConfig(),
    "greedy": SamplingConfig(do_sample=False),
}


def resolve_sampling(preset: str | SamplingConfig, **overrides) -> SamplingConfig:
    """A preset (name or config) with the given non-``None`` fields replaced.

    Giving ``temperature``, ``top_k`` or ``top_p`` switches sampling on (also for the ``"greedy"``
    preset) unless ``do_sample=False`` is given too.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown sampling preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.keys() & {"temperature", "top_k", "top_p"}:
        overrides.setdefault("do_sample", True)
    return dataclasses.replace(preset, **overrides)


def logits_warpers(config: SamplingConfig, vocab_size: int) -> LogitsProcessorList:
    """transformers' warpers for ``config``, leaving out the ones that would not change anything
    (a top-k over at least the whole vocabulary still sorts it)."""
    warpers = LogitsProcessorList()
    if not config.do_sample:
        return warpers
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(config.temperature)))
    if config.top_k and config.top_k < vocab_size:
        warpers.append(TopKLogitsWarper(int(config.top_k)))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(config.top_p)))
    return warpers


class RowUniforms:
    """Pre-drawn uniforms ``[rows, steps]`` in float64, one independent stream per row.

    With ``seed=s`` row ``i`` uses ``torch.Generator().manual_seed(s + i)``, so an image made as row
    ``i`` of a batch is reproduced by a batch of one with ``seed=s + i`` (or ``seed=[...]``, one per
    row). A list of generators gives one per row too (the diffusers convention). A single
    generator feeds all rows in order: reproducible for the same call, but a row's draws then
    depend on its index.
    """

    def __init__(
        self,
        rows: int,
        steps: int,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ):
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if seed is None and generator is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from torch's global RNG
        if isinstance(generator, torch.Generator):
            self.values = torch.rand(rows, steps, generator=generator, dtype=torch.float64,
                                     device=generator.device).cpu()
            return
        if generator is None:
            seeds = [seed + i for i in range(rows)] if isinstance(seed, int) else list(seed)
            generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if len(generator) != rows:
            raise ValueError(f"got {len(generator)} seeds/generators for {rows} rows; pass one per output row")
        self.values = torch.stack([
            torch.rand(steps, generator=g, dtype=torch.float64, device=g.device).cpu() for g in generator
        ])  # [rows, steps]

    def rows(self, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
        """Uniforms of rows ``start:stop`` on ``device``: ``[stop - start, steps]``."""
        return self.values[start:stop].to(device)


def sample_tokens(scores: torch.Tensor, uniforms: torch.Tensor | None) -> torch.LongTensor:
    """Pick one id per row of ``scores [B, V]`` (processed logits, ``-inf`` = forbidden).

    ``uniforms [B]`` in [0, 1): inverse-CDF sampling (row ``b`` takes the first id whose cumulative
    probability exceeds ``uniforms[b]``), exact and independent of the other rows; ``None``: argmax.
    """
    if uniforms is None:
        return scores.argmax(-1)
    probs = scores.float().softmax(-1)  # [B, V]; forbidden ids get exactly 0
    cdf = probs.double().cumsum(-1)  # float64: the tail of a 16k-long cumsum stays exact enough
    target = uniforms.to(cdf).unsqueeze(-1) * cdf[:, -1:]  # [B, 1]; scaled by the total, not 1
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=scores.shape[-1] - 1)
    # `right=True` skips zero-width (forbidden) ids; the clamp could still land on one when
    # rounding puts the target on the total: take the argmax in that measure-zero case.
    chosen = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(chosen > 0, ids, probs.argmax(-1))


class ImageSpanConstraint(LogitsProcessor):
    """Keeps image spans well formed: a `transformers` logits processor, so it also works in
    ``model.generate(logits_processor=[...])``.

    The state of each row is read from ``input_ids`` (whatever the prompt contained): inside an
    open span (a ``<boi>`` after the last ``<eoi>``) only image ids may follow until there are
    ``num_image_tokens`` of them, then only ``<eoi>``. Outside a span image ids and ``<eoi>`` are
    forbidden, and so is ``<boi>`` unless ``allow_images`` and the span fits in ``max_length``.

    Args:
        image_token_range: ``(first, last + 1)`` of the contiguous image ids.
        boi_token_id, eoi_token_id: the span delimiters.
        num_image_tokens: ``h * w``.
        allow_images: let text generation open image spans (interleaved output).
        max_length: total sequence length the caller stops at; a span is only opened if it can close.
        text_vocab_size: ids at or above it (embedding rows padded to a multiple of 64) and not in
            the image range are never sampled; ``None`` leaves them.
        blocked_ids: other ids never to emit outside a span (e.g. the pad token).
    """

    def __init__(
        self,
        image_token_range: tuple[int, int],
        boi_token_id: int,
        eoi_token_id: int,
        num_image_tokens: int,
        allow_images: bool = False,
        max_length: int | None = None,
        text_vocab_size: int | None = None,
        blocked_ids: Sequence[int] = (),
    ):
        self.lo, self.hi = image_token_range
        self.boi, self.eoi = boi_token_id, eoi_token_id
        self.num_image_tokens = num_image_tokens
        self.allow_images = allow_images
        self.max_length = max_length
        self.text_vocab_size = text_vocab_size
        self.blocked_ids = list(blocked_ids)
        self._masks: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_processor(cls, processor, allow_images: bool = False, max_length: int | None = None):
        """Build from a `UnimodalProcessor`; also blocks the pad token when it is not ``<eos>``."""
        top = max(len(processor.tokenizer), processor.image_token_range[1],
                  processor.boi_token_id + 1, processor.eoi_token_id + 1)
        pad, eos = processor.pad_token_id, processor.eos_token_id
        return cls(processor.image_token_range, processor.boi_token_id, processor.eoi_token_id,
                   processor.num_image_tokens, allow_images=allow_images, max_length=max_length,
                   text_vocab_size=top, blocked_ids=[pad] if pad is not None and pad != eos else [])

    def _text_and_image_masks(self, vocab_size: int, device: torch.device):
        """Boolean ``[V]`` masks of the ids allowed outside a span and inside one (cached)."""
        key = (vocab_size, device)
        if key not in self._masks:
            ids = torch.arange(vocab_size, device=device)
            image = (ids >= self.lo) & (ids < self.hi)
            text = ~image & (ids != self.boi) & (ids != self.eoi)
            if self.text_vocab_size is not None:
                text &= ids < self.text_vocab_size
            if self.blocked_ids:
                text &= ~torch.isin(ids, torch.tensor(self.blocked_ids, device=device))
            self._masks[key] = (text, image)
        return self._masks[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        text, image = self._text_and_image_masks(scores.shape[-1], scores.device)
        # Position of the last <boi> / <eoi> per row (-1 if none): [B]
        pos = torch.arange(1, length + 1, device=input_ids.device)
        last_boi = ((input_ids == self.boi) * pos).amax(-1) - 1
        last_eoi = ((input_ids == self.eoi) * pos).amax(-1) - 1
        in_span = last_boi > last_eoi
        span_full = in_span & (length - 1 - last_boi >= self.num_image_tokens)

        allowed = torch.where(in_span[:, None], image, text).clone()  # [B, V]
        allowed[span_full] = False
        allowed[span_full, self.eoi] = True
        if self.allow_images:
            # Room for <boi>, h*w image ids and <eoi> before max_length.
            fits = self.max_length is None or length + self.num_image_tokens + 2 <= self.max_length
            allowed[:, self.boi] = ~in_span & fits
        return scores.masked_fill(~allowed, float("-inf"))
