"""Speculative Jacobi decoding of image spans (SJD: Teng et al. 2024, arXiv 2410.01699).

Each row keeps a window of draft image tokens after the ones it has accepted. One forward pass
over ``[last accepted token, drafts...]`` gives the model's distribution ``p`` at every draft
position. Drafts are accepted left to right with probability ``min(1, p(d) / q(d))``, ``q`` being
the distribution the draft was drawn from; the first rejected draft is replaced by a draw from
``max(0, p - q)`` (normalised), and when every draft passes, the pass's last ``p`` gives one token
more. This is speculative sampling, so every accepted token has exactly the distribution
token-by-token sampling gives it. The drafts after a rejection are redrawn from this pass's ``p``
at their positions (computed after the rejected drafts: the Jacobi iteration, ``q`` = that
``p``), maximally coupled to the drafts they replace (MC-SJD, So et al. 2025, arXiv 2510.24211):
a draft stays with probability ``min(1, p(d) / q(d))``, else it is drawn from ``max(0, p - q)``,
so it is distributed as ``p`` yet changes as rarely as possible from pass to pass, and the
context of the drafts after it settles sooner. A draft's own randomness never feeds the
distributions it is tested against (those read only earlier positions), which keeps the rule
exact. Positions new to the window start as uniform draws over the image codes. Greedy decoding
accepts a draft iff it is the argmax, which reproduces token-by-token greedy decoding exactly.
The first pass is the prefill itself (prompt, ``<boi>`` and the first drafts in one forward), so a
span of N tokens takes at most N passes, as token by token does, and usually fewer.

Rows accept different counts. The KV cache keeps the positions every unfinished row has accepted
(the shortest row's prefix); each pass re-feeds a row's accepted tokens past that point, so the
pass is ``max(row offset) + window + 1`` tokens wide and every row always gets a full window:
a row's tokens depend on its own random stream only, never on the rest of the batch. Its
uniforms are indexed by (its own pass count, window slot): see `JacobiDecoding.uniform_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import KVDecoder
from .sampling import TokenSampler, _inverse_cdf


@dataclass
class DecodeStats:
    """Counters a generation adds to (pass one to `sample_image_tokens`): forward passes per batch
    of rows, the prefill included (one per token for token-by-token decoding), image tokens made, drafts proposed and
    accepted (speculative decoding only) and seconds spent compiling (`StaticKVDecoder`)."""

    forward_passes: int = 0
    tokens: int = 0
    drafts: int = 0
    accepted: int = 0
    compile_seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        """Accepted / proposed drafts (``nan`` without drafts)."""
        return self.accepted / self.drafts if self.drafts else float("nan")


class JacobiDecoding:
    """Speculative Jacobi decoding with ``window`` draft tokens per row (see the module docstring).

    Args:
        window: drafts verified per forward pass; larger windows accept more per pass on peaked
            models but make each pass wider (on a CPU, where cost grows with tokens per pass,
            8-16 is the useful range).
    """

    def __init__(self, window: int = 16):
        if window < 1:
            raise ValueError(f"the Jacobi window must be >= 1 draft token, got {window}")
        self.window = window

    def uniform_steps(self, n_tokens: int) -> int:
        """Uniform pairs per row for a span of ``n_tokens`` (a `RowUniforms` ``steps``): one group
        of ``2 * window + 1`` slots for the first drafts, then one per pass (at most ``n_tokens``
        passes, as each pass adds a token)."""
        return (n_tokens + 1) * (2 * self.window + 1)

    def accept(self, p_draft: torch.Tensor, q_draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """SJD's rule: accept a draft iff ``u < p(d) / q(d)`` (all ``[B, W]``, ``q(d) > 0``)."""
        return u * q_draft < p_draft

    def keep(self, p_draft: torch.Tensor, q_draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The maximal coupling's keep branch for a draft past the first rejection: keep it iff
        ``u < p(d) / q(d)`` (all ``[B, W]``), else it becomes a draw from ``max(0, p - q)``."""
        return self.accept(p_draft, q_draft, u)

    @torch.no_grad()
    def sample(
        self,
        decoder: KVDecoder,
        sampler: TokenSampler,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        n_tokens: int,
        uniforms: torch.Tensor | None,
        stats: DecodeStats | None = None,
    ) -> torch.Tensor:
        """One image span per row; returns codes ``[B, n_tokens]`` (``0 .. K-1``).

        Args:
            decoder: a fresh `KVDecoder` whose ``vocab_slice`` is the image ids ``lo:lo + K``.
            sampler: guidance, temperature, filters (and greedy when ``do_sample=False``).
            prompt_ids, attention_mask: ``[R, L]`` left-padded prompts ending in ``<boi>``,
                ``R = 2B`` (cond rows, then uncond rows) with guidance, else ``B``.
            uniforms: ``[B, uniform_steps(n_tokens), 2]`` (`RowUniforms.rows`), ``None`` for greedy.
        """
        guided = sampler.config.guidance_scale > 1
        rows = prompt_ids.shape[0] // 2 if guided else prompt_ids.shape[0]
        assert decoder.vocab_slice is not None, "JacobiDecoding needs a decoder over the image ids"
        lo, hi = decoder.vocab_slice
        codes_k, window, device = hi - lo, self.window, decoder.device
        boi = prompt_ids[:rows, -1:].to(device)  # [B, 1]
        slots = torch.arange(2 * window + 1, device=device)  # window slots, relative to a row's last accepted
        # u[b, g, j]: row b's uniforms of slot group g (0: first drafts, g > 0: its g-th pass)
        u = None if uniforms is None else uniforms.to(device).view(rows, n_tokens + 1, 2 * window + 1, 2)
        dummy = torch.zeros(rows * (window + 1), 1, dtype=torch.long, device=device)  # processors read its batch size
        # Accepted codes (padded so a full window can be written past the end): [B, N + W + 1]
        codes = torch.zeros(rows, n_tokens + window + 1, dtype=torch.long, device=device)
        n = torch.zeros(rows, dtype=torch.long, device=device)  # accepted per row
        passes = torch.zeros(rows, dtype=torch.long, device=device)  # passes per row (slot groups used)
        if u is None:
            drafts = torch.zeros(rows, window, dtype=torch.long, device=device)
            q = None
        else:
            drafts = (u[:, 0, 1 : window + 1, 1] * codes_k).long().clamp_(max=codes_k - 1)  # uniform: [B, W]
            q = torch.full((rows, window, codes_k), 1 / codes_k, device=device)  # their distribution
        cached = 0  # image positions (after <boi>) in the KV cache, the same for every row
        prefilled = False
        while True:
            active = n < n_tokens
            k = torch.where(active, (n_tokens - 1 - n).clamp(max=window), 0)  # drafts to verify per row
            offset = torch.where(active, n - cached, 0)  # where a row's last accepted sits in the pass
            width = int((offset + 1 + k).max())
            # The pass: row b feeds positions cached .. cached + width - 1 of [<boi>, codes, drafts]
            pos = cached + torch.arange(width, device=device)  # [width]; position 0 is <boi>
            rel = pos - n[:, None] - 1  # [B, width]: draft index, < 0 for accepted positions
            accepted = codes.gather(1, (pos - 1).clamp(0, n_tokens - 1).expand(rows, -1)) + lo
            drafted = drafts.gather(1, rel.clamp(0, window - 1)) + lo
            tokens = torch.where(rel < 0, torch.where(pos == 0, boi, accepted), drafted)  # [B, width]
            fed = torch.cat([tokens, tokens]) if guided else tokens  # [R, width]
            if not prefilled:  # the first pass is the prefill: prompt, <boi> and the first drafts
                prompt = prompt_ids[:, :-1].to(device)
                mask = torch.cat([attention_mask[:, :-1].to(device), attention_mask.new_ones(len(fed), width)
                                  .to(device)], 1)
                logits = decoder.prefill_extend(torch.cat([prompt, fed], 1), mask, width)  # [R, width, K]
                prefilled = True
            else:
                logits = decoder.extend(fed)  # [R, width, K]
            # Row b's distributions at its window: j = 0 (after its last accepted) .. W: [B, W + 1, K]
            at = (offset[:, None] + slots[: window + 1]).clamp(max=width - 1)
            raw = logits.gather(1, torch.cat([at, at] if guided else [at])[..., None].expand(-1, -1, codes_k))
            scores = sampler.scores(dummy, raw.reshape(-1, codes_k)).view(rows, window + 1, codes_k)
            verify = slots[:window] < k[:, None]  # [B, W] drafts this pass verifies
            if u is None:
                best = scores.argmax(-1)  # [B, W + 1]
                ok = (drafts == best[:, :window]) & verify
                r = ok.long().cumprod(-1).sum(-1)  # accepted drafts per row: [B]
                new = best.gather(1, r[:, None]).squeeze(1)
                # Next drafts: this pass's argmax where it has one, else the last one repeated.
                nxt = (r[:, None] + 1 + slots[:window]).clamp(max=window)
                nxt = torch.minimum(nxt, k[:, None])
                next_drafts, next_q = best.gather(1, nxt), None
            else:
                assert q is not None
                g = u[torch.arange(rows, device=device), passes + 1]  # this pass's slots: [B, 2W + 1, 2]
                p = sampler.distribution(dummy, scores.view(-1, codes_k)).view(rows, window + 1, codes_k)
                p_d = p[:, :window].gather(-1, drafts[..., None]).squeeze(-1)
                q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
                ok = self.accept(p_d, q_d, g[:, :window, 0]) & verify  # [B, W]
                r = ok.long().cumprod(-1).sum(-1)  # accepted drafts per row: [B]
                # max(0, p - q) at every drafted slot, p past them; p where p == q (measure zero).
                residual = torch.cat([torch.where(verify[..., None], (p[:, :window] - q).clamp(min=0),
                                                  p[:, :window]), p[:, window:]], 1)  # [B, W + 1, K]
                residual = torch.where(residual.sum(-1, keepdim=True) <= 0, p, residual)
                drawn = _inverse_cdf(residual.reshape(-1, codes_k), g[:, : window + 1, 1].reshape(-1)).view(rows, -1)
                new = drawn.gather(1, r[:, None]).squeeze(1)  # slot r: the rejected draft's replacement
                # Past slot r the next drafts are p's draws coupled to the current ones (see the
                # module docstring); the keep test reuses the slot's acceptance uniform, which the
                # rule leaves unused past r.
                kept = self.keep(p_d, q_d, g[:, :window, 0]) & verify
                coupled = torch.cat([torch.where(kept, drafts, drawn[:, :window]), drawn[:, window:]], 1)
                # Next window: slots r + 1 .. r + W. Drawn from this pass's p up to slot k, else uniform.
                nxt = r[:, None] + 1 + slots[:window]  # [B, W] in 1 .. 2W
                from_p = nxt <= k[:, None]
                fresh = (g[:, :, 1].gather(1, nxt) * codes_k).long().clamp_(max=codes_k - 1)
                next_drafts = torch.where(from_p, coupled.gather(1, nxt.clamp(max=window)), fresh)
                p_next = p.gather(1, nxt.clamp(max=window)[..., None].expand(-1, -1, codes_k))
                next_q = torch.where(from_p[..., None], p_next, torch.full_like(p_next, 1 / codes_k))
            # Commit drafts 0 .. r-1 and the new token at slot r: codes n .. n + r
            values = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, r[:, None], new[:, None])  # [B, W + 1]
            where = n[:, None] + slots[: window + 1]
            keep = (slots[: window + 1] <= r[:, None]) & active[:, None]
            codes.scatter_(1, where, torch.where(keep, values, codes.gather(1, where)))
            n = n + torch.where(active, r + 1, 0)
            passes = passes + active.long()
            drafts = torch.where(active[:, None], next_drafts, drafts)
            if q is not None and next_q is not None:
                q = torch.where(active[:, None, None], next_q, q)
            if stats is not None:
                stats.forward_passes += 1
                stats.drafts += int(k.sum())
                stats.accepted += int(r.sum())
            still = n < n_tokens
            if not still.any():
                break
            # Keep in the cache what every unfinished row has accepted; drop the rest of the pass.
            keep_cached = int(n[still].min())
            decoder.crop(cached + width - keep_cached)
            cached = keep_cached
        if stats is not None:
            stats.tokens += rows * n_tokens
        return codes[:, :n_tokens]
