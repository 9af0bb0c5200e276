"""``rng="global"``: image ids drawn as transformers' ``generate`` draws them, for id-for-id parity.

transformers' sampling loop (`GenerationMixin._sample`, and Janus's image ``generate``) applies its
logits processors in this order: classifier-free guidance, the model's own constraint (e.g. Emu3's
``prefix_allowed_tokens_fn``), then the warpers temperature, top-k, top-p; it softmaxes the result
over the whole width it computed logits for and calls ``torch.multinomial(probs, 1)`` on torch's
global generator for the whole batch at once, one call per generated token, forced tokens
included. `GlobalDraws` does the same with `TokenSampler`'s processors and filters (the same
classes, in the same order), so after ``torch.manual_seed(seed)`` the sampled image ids equal that
``generate``'s with the same seed and settings.

The default per-row streams (`RowUniforms`) stay the default: a row's image then does not depend
on the batch it was made in, which a single shared stream cannot give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .sampling import TokenSampler

RNGS = ("row", "global")


@dataclass(frozen=True)
class DrawLayout:
    """Where the model's own ``generate`` draws an image id from.

    Args:
        width: how many logits its draw spans (``[B, width]`` probabilities per step).
        offset: the column of the first image id in them (our ``K`` image logits are
            ``offset:offset + K``).
        forced_every: its ``generate`` also draws once (a forced id, e.g. Emu3's end-of-line)
            after every ``forced_every`` image ids; those draws consume the generator too.
    """

    width: int
    offset: int
    forced_every: int | None = None


def draw_layout(model: nn.Module, processor) -> DrawLayout:
    """The processor's ``generate_draw_layout(model)`` where it has one (a unified base whose
    ``generate`` differs), else the plain LM's: the output embedding's rows, image ids at
    ``image_token_range[0]``."""
    hook = getattr(processor, "generate_draw_layout", None)
    if hook is not None:
        return cast(DrawLayout, hook(model))
    head = cast(Any, model).get_output_embeddings()  # a transformers model (nn.Module in the stubs)
    return DrawLayout(width=int(head.weight.shape[0]), offset=processor.image_token_range[0])


class GlobalDraws:
    """`TokenSampler`'s processing, then one ``torch.multinomial`` over the batch on the global
    generator, laid out as `DrawLayout` says: a drop-in for the sampler in `sample_image_tokens`.

    Args:
        sampler: its guidance, temperature (``scores``) and top-k / top-p (``filters``) are used.
        layout: the width and offset of the draw, and the forced draws in between.
    """

    def __init__(self, sampler: TokenSampler, layout: DrawLayout):
        self.sampler, self.layout = sampler, layout

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor,
                 uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """``logits [B or 2B, K]`` of the image ids -> image ids ``[B]`` (in ``0..K-1``).

        ``input_ids [B, t]``: the ``t`` ids drawn so far in this span (its width tells which
        draw this is). ``uniforms`` must be ``None``: the draws come from the global generator.
        """
        if uniforms is not None:
            raise ValueError("rng='global' draws from torch's global generator; it takes no uniforms")
        scores = self.sampler.scores(input_ids, logits)  # guidance, temperature: [B, K]
        if not self.sampler.config.do_sample:
            return scores.argmax(-1)
        if self.sampler.filters:  # transformers' TopK / TopP warpers, applied as generate applies them
            scores = self.sampler.filters(cast(torch.LongTensor, input_ids), scores)
        lo, k = self.layout.offset, scores.shape[-1]
        full = scores.new_full((scores.shape[0], self.layout.width), float("-inf"))  # [B, width]
        full[:, lo:lo + k] = scores
        ids = torch.multinomial(full.softmax(-1), num_samples=1).squeeze(-1) - lo  # [B]
        every = self.layout.forced_every
        if every and (input_ids.shape[1] + 1) % every == 0:
            # generate draws the forced id too: a draw over the same shape consumes the generator
            # the same whatever the probabilities are.
            torch.multinomial(torch.ones_like(full), num_samples=1)
        return ids
