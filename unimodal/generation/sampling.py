"""Sampling settings, per-row random streams, the token sampler and the image-span constraint.

transformers already has the pieces that reshape a distribution (batched classifier-free
guidance, temperature, top-k, top-p); we use them. What they lack for a unified text+image LM,
sampled fast and reproducibly in batches, is written here:

- `RowUniforms`: one random stream per output row, so row ``i`` samples the same tokens whatever
  else is in the batch (``torch.multinomial`` on a batch draws from one shared stream);
- `TokenSampler`: inverse-CDF sampling from those streams, with top-k/top-p applied without
  sorting the vocabulary each step (exactly the distribution of transformers' warpers);
- `ImageSpanConstraint`: after ``<boi>`` only image ids, exactly ``h*w`` of them, then ``<eoi>``;
  outside a span no image ids (and ``<boi>`` only when interleaved output is allowed).

A model carries its recommended settings in ``generation_config.json`` (`set_sampling` writes
them, `model_sampling` reads them); generation uses them unless told otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import (
    ClassifierFreeGuidanceLogitsProcessor,
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


# What a model without its own settings gets, per task: Liquid's text-to-image settings, and the
# argmax for text (what captioning accuracy is measured with).
FALLBACK_PRESETS = {"image": "liquid", "text": "greedy"}
SAMPLING_SOURCE_MODEL = "model"  # `model_sampling`'s source for settings from generation_config.json


def _settings_key(task: str) -> str:
    """The `GenerationConfig` attribute holding a task's settings: ``unimodal_image`` / ``unimodal_text``."""
    if task not in FALLBACK_PRESETS:
        raise ValueError(f"task must be one of {sorted(FALLBACK_PRESETS)}, got {task!r}")
    return f"unimodal_{task}"


def model_sampling(model, task: str = "image") -> tuple[SamplingConfig, str]:
    """The sampling settings ``model`` was saved with for ``task`` (``"image"``: text-to-image,
    ``"text"``: text generation), and where they come from.

    They live in ``model.generation_config`` as ``unimodal_image`` / ``unimodal_text`` (a dict of
    `SamplingConfig` fields; `set_sampling` writes it, ``save_pretrained`` stores it in
    ``generation_config.json``). A model without them gets ``FALLBACK_PRESETS[task]``. transformers'
    own fields (``temperature``, ``top_p``, ...) are not read: in a base LM's file they are its
    chat settings, not settings anyone measured image or caption quality with.

    Returns:
        ``(config, source)`` with ``source`` ``"model"`` or ``"preset <name>"``.
    """
    key = _settings_key(task)
    stored = getattr(getattr(model, "generation_config", None), key, None)
    if stored is None:
        name = FALLBACK_PRESETS[task]
        return PRESETS[name], f"preset {name}"
    try:
        return SamplingConfig(**stored), SAMPLING_SOURCE_MODEL
    except (TypeError, ValueError) as err:
        raise ValueError(f"the model's generation_config.json has unusable {key}={stored!r} ({err}); "
                         f"fix it, or write it again with unimodal.generation.set_sampling") from None


def set_sampling(model, sampling: str | SamplingConfig | None, task: str = "image") -> None:
    """Record ``sampling`` (a preset name or config; ``None`` removes it) as ``model``'s settings for
    ``task`` in ``model.generation_config``, so ``save_pretrained`` writes them to
    ``generation_config.json`` and `model_sampling` (hence `generate_images`, the web demo and
    ``unimodal generate``) uses them by default."""
    key = _settings_key(task)
    config = model.generation_config
    if sampling is None:
        if hasattr(config, key):
            delattr(config, key)
        return
    setattr(config, key, dataclasses.asdict(resolve_sampling(sampling)))
    # A generation config derived from the model config (a model built from a config) is saved
    # with `_from_model_config: true`, and transformers drops every extra field of such a file
    # when loading it: the settings would vanish on the way back.
    config._from_model_config = False


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


class RowUniforms:
    """Pre-drawn uniforms ``[rows, steps, 2]`` in float64, one independent stream per row (two
    numbers per step: see `TokenSampler`).

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
            self.values = torch.rand(rows, steps, 2, generator=generator, dtype=torch.float64,
                                     device=generator.device).cpu()
            return
        if generator is None:
            assert seed is not None  # drawn above when neither was given
            seeds = [seed + i for i in range(rows)] if isinstance(seed, int) else list(seed)
            generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if len(generator) != rows:
            raise ValueError(f"got {len(generator)} seeds/generators for {rows} rows; pass one per output row")
        self.values = torch.stack([
            torch.rand(steps, 2, generator=g, dtype=torch.float64, device=g.device).cpu() for g in generator
        ])  # [rows, steps, 2]

    def rows(self, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
        """Uniforms of rows ``start:stop`` on ``device``: ``[stop - start, steps, 2]``."""
        return self.values[start:stop].to(device)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row ``b`` of ``probs [B, V]`` (unnormalised, >= 0) -> the first id whose cumulative mass
    exceeds ``u[b]`` times the total. Zero-probability ids are never returned (a row needs mass)."""
    cdf = probs.cumsum(-1)  # [B, V], nondecreasing; its last entry may miss 1 by rounding: scale u by it
    # u * total must stay below the total (then the first cdf entry above it rose there: its id has
    # mass; `right=True` skips zero-width ids); (1 - 2^-23) * total rounds below it, rounding is monotone.
    target = u.to(cdf.dtype).clamp(max=1 - 2**-23).unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def in_top_k_top_p(
    scores: torch.Tensor, ids: torch.Tensor, top_k: int | None, top_p: float, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Whether ``ids [B, n]`` survive transformers' ``TopKLogitsWarper`` then ``TopPLogitsWarper``
    on ``scores [B, V]``, without sorting the vocabulary: ``[B, n]`` bool.

    An id is in the top-k iff fewer than ``k`` ids score strictly higher; it survives top-p iff
    the (top-k renormalised) mass of the ids scoring strictly higher is below ``top_p``.
    ``probs``: ``scores.softmax(-1)`` when the caller has it.
    """
    vocab = scores.shape[-1]
    top_k = top_k if top_k and top_k < vocab else None
    higher = scores.unsqueeze(1) > scores.gather(-1, ids).unsqueeze(-1)  # [B, n, V]
    if top_k:
        count = higher.sum(-1, dtype=torch.int32)  # [B, n]: ids scoring higher
        in_k = count < top_k
    if top_p == 1:
        return in_k if top_k else torch.ones_like(ids, dtype=torch.bool)
    probs = scores.softmax(-1) if probs is None else probs
    above = (probs.unsqueeze(1) * higher).sum(-1)  # [B, n]: mass of the ids scoring higher
    if not top_k:
        return above < top_p
    # The verdict is `above < top_p * M` with M the top-k mass, which needs an O(V) selection; a
    # lower bound on M settles it for all ids but those near the top-p edge. The top-k holds the
    # c ids scoring higher (mass `above`), the id and the k - c - 1 best of the V - c - 1 others,
    # which share the rest of the mass: the V - k of them left out weigh at most their mean, so
    # M >= 1 - rest * (V - k) / (V - 1 - c), with V - 1 - c >= V - k > 0 inside the top-k (c < k).
    rest = (1 - above).sub_(probs.gather(-1, ids)).clamp_(min=0)  # [B, n]
    keep = in_k & (torch.addcdiv(above, rest, (vocab - 1) - count, value=top_p * (vocab - top_k)) < top_p)
    if bool(keep.all()):  # the sampler's common case, settled in one reduction: each op counts per token
        return keep
    unsure = in_k & ~keep & (above < top_p)
    if unsure.any():
        rows = unsure.any(-1)
        sel: slice | torch.Tensor = slice(None) if rows.all() else rows  # a view, not a copy, when all are
        kth = scores[sel].kthvalue(vocab - top_k + 1, dim=-1, keepdim=True).values
        mass = (probs[sel] * (scores[sel] >= kth)).sum(-1, keepdim=True)  # [b, 1]
        keep[sel] |= unsure[sel] & (above[sel] < top_p * mass)
    return keep


class TokenSampler:
    """Chooses the next id per row: guidance and temperature (transformers' processors), then
    top-k / top-p sampling, exact and one random stream per row.

    transformers' top-k and top-p warpers each sort the whole vocabulary every step (measured:
    as slow as the tiny models' forward pass at batch 16). Here a proposal is drawn from the
    unfiltered distribution with the row's first uniform and kept if it survives the filters
    (`in_top_k_top_p`, linear time), which it does unless it fell in the thin filtered-out tail;
    a rejected row instead samples the filtered distribution (`_filtered_draw`) with its second
    uniform. Accept-or-fallback draws exactly from the filtered distribution:
    ``P(S) q(x) + (1 - P(S)) q(x) = q(x)`` for the kept set ``S`` and filtered ``q``.

    Args:
        config: the `SamplingConfig`.
    """

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.processors = LogitsProcessorList()
        if config.guidance_scale > 1:  # scores [2B, V] (cond rows, then uncond rows) -> [B, V]
            self.processors.append(ClassifierFreeGuidanceLogitsProcessor(config.guidance_scale))
        if config.do_sample and config.temperature != 1.0:
            self.processors.append(TemperatureLogitsWarper(float(config.temperature)))
        self.top_k = config.top_k or None
        self.filters = LogitsProcessorList()
        if self.top_k:
            self.filters.append(TopKLogitsWarper(int(self.top_k)))
        if config.top_p < 1:
            self.filters.append(TopPLogitsWarper(float(config.top_p)))

    def scores(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Guidance and temperature: ``logits [B or 2B, V]`` -> ``[B, V]`` (``input_ids``: ``[B, t]``)."""
        for processor in self.processors:  # not LogitsProcessorList.__call__: it inspects signatures per call
            logits = processor(input_ids, logits)
        return logits

    def distribution(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The distribution `__call__` samples from, exactly: top-k / top-p of ``scores [B, V]``
        (from `scores`), softmaxed: ``[B, V]``. Sorts the vocabulary (speculative decoding needs
        every probability, not just a sample)."""
        if self.filters:
            scores = self.filters(cast(torch.LongTensor, input_ids), scores)
        return scores.softmax(-1)

    def __call__(
        self, input_ids: torch.Tensor, logits: torch.Tensor, uniforms: torch.Tensor | None
    ) -> torch.Tensor:
        """``logits [B or 2B, V]`` (``-inf`` = forbidden), ``uniforms [B, 2]`` -> ids ``[B]``.

        ``input_ids [B, t]`` is what transformers' processors expect (only its batch size is read
        by the ones used here); ``uniforms=None`` is required for (and means) greedy.
        """
        logits = self.scores(input_ids, logits)
        if not self.config.do_sample:
            return logits.argmax(-1)
        if uniforms is None:
            raise ValueError("sampling needs uniforms (see RowUniforms); pass do_sample=False for greedy")
        probs = logits.softmax(-1)
        ids = _inverse_cdf(probs, uniforms[:, 0])  # proposal: [B]
        if not self.filters:
            return ids
        kept = in_top_k_top_p(logits, ids.unsqueeze(-1), self.top_k, self.config.top_p, probs).squeeze(-1)
        if not kept.all():
            rejected = ~kept
            ids[rejected] = self._filtered_draw(input_ids[rejected], logits[rejected], uniforms[rejected, 1])
        return ids

    def _filtered_draw(self, input_ids: torch.Tensor, scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Draws from the top-k / top-p filtered distribution of ``scores [b, V]`` with ``u [b]``:
        ids ``[b]``, for the rows whose proposal was filtered out.

        A partial sort (the best ``k + 1`` ids, descending) and `in_top_k_top_p`'s rule on it: an
        id is kept while the mass before it is below ``top_p`` of the top-k mass. transformers'
        warpers sort the whole vocabulary (5x the time of this at 8192 ids); a row with equal scores
        across an edge of the kept set, where the order of ties matters, still goes through them.
        """
        vocab = scores.shape[-1]
        k = self.top_k if self.top_k and self.top_k < vocab else vocab
        values, order = scores.topk(min(k + 1, vocab))  # [b, k + 1] (k = V: [b, V])
        weights = (values[:, :k] - values[:, :1]).exp()  # the top-k's probabilities, unnormalised: [b, k]
        if self.config.top_p < 1:
            cum = weights.cumsum(-1)
            weights = weights * (cum - weights < self.config.top_p * cum[:, -1:])
        ids = order.gather(-1, _inverse_cdf(weights, u).unsqueeze(-1)).squeeze(-1)
        # A tie across the last kept position (the kept set is a prefix) or across the top-k's edge.
        last = (weights > 0).sum(-1, keepdim=True) - 1  # [b, 1]
        edges = torch.cat([last, torch.full_like(last, k - 1)], -1)  # [b, 2]
        after = (edges + 1).clamp(max=values.shape[-1] - 1)  # the position past each edge (if any)
        beyond = values.gather(-1, after)
        ties = ((after > edges) & (values.gather(-1, edges) == beyond) & beyond.isfinite()).any(-1)  # [b]
        if ties.any():
            # transformers types input_ids as LongTensor
            filtered = self.filters(cast(torch.LongTensor, input_ids[ties]), scores[ties])
            ids[ties] = _inverse_cdf(filtered.softmax(-1), u[ties])
        return ids


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
        """Build from a `UnimodalProcessor`; also blocks the pad token when it is not ``<eos>``, and
        a unified base's span control ids (``processor.span_control_ids``, e.g. Emu3's row ends)."""
        top = max(len(processor.tokenizer), processor.image_token_range[1],
                  processor.boi_token_id + 1, processor.eoi_token_id + 1)
        pad, eos = processor.pad_token_id, processor.eos_token_id
        blocked = [pad] if pad is not None and pad != eos else []
        blocked += [int(i) for i in getattr(processor, "span_control_ids", ())]
        return cls(processor.image_token_range, processor.boi_token_id, processor.eoi_token_id,
                   processor.num_image_tokens, allow_images=allow_images, max_length=max_length,
                   text_vocab_size=top, blocked_ids=blocked)

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
        return cast(torch.FloatTensor, scores.masked_fill(~allowed, float("-inf")))  # LogitsProcessor's type
