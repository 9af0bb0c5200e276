"""Vector quantizer: nearest-neighbour codebook lookup with a straight-through gradient.

The lecture's VQ-VAE step: each latent vector ``z`` is replaced by its nearest code ``e_k``;
the codebook learns from ``||sg[z] - e||^2`` (codebook loss) and the encoder is kept close to its
codes by ``beta * ||z - sg[e]||^2`` (commitment loss); gradients skip the non-differentiable
argmin by copying ``dL/dz_q`` to ``z`` (straight-through). Options that keep codes alive
(plain VQ collapses to a few codes at once): l2-normalised codes, EMA codebook updates, k-means
initialisation and dead-code restart.

Everything here runs in fp32, also under bf16 autocast: the argmin over distances is what turns
latents into tokens, and bf16 rounding flips it. Codebook statistics (EMA sums, usage, restarts,
k-means) are all-reduced / broadcast when ``torch.distributed`` is initialised, so every rank keeps
an identical codebook; without it they are local no-ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# transformers' init functions behave like torch.nn.init but skip tensors `from_pretrained` has
# already loaded, so re-initialising this module after a load keeps a saved codebook and EMA state.
from transformers import initialization as init

# ----------------------------------------------------------------------------- distributed helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (no-op without an initialised process group)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy (no-op without a process group)."""
    if _distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


# ----------------------------------------------------------------------------- codebook math


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of a code histogram ``counts [K]``: the effective number of codes in use.

    ``K`` when all codes are equally frequent, 1 when one code takes everything; 0-d, in the
    dtype and on the device of ``counts`` (float it first; float64 for exact evaluation numbers).
    An all-zero histogram gives 1.
    """
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: 0 log 0 = 0, no clamp needed


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Index of the nearest row of ``codebook [K, D]`` for each row of ``z [N, D]`` -> ``[N]``.

    The squared distance ``|z|^2 - 2 z.e + |e|^2`` is smallest where ``z.e - |e|^2 / 2`` is largest
    (``|z|^2`` is the same for every code), and that is one matmul of ``[z, -1/2]`` with
    ``[e, |e|^2]``: no elementwise pass over the ``[N, K]`` matrix, which at K = 65,536 cost more
    than the matmul. The default chunk keeps that matrix under 2^26 floats (256 MB).
    """
    chunk = chunk or max(1, 2**26 // codebook.shape[0])
    table = torch.cat([codebook, codebook.pow(2).sum(1, keepdim=True)], 1).t()  # [D + 1, K]
    out = [(torch.cat([zc, zc.new_full((zc.shape[0], 1), -0.5)], 1) @ table).argmax(1)  # [n, K] -> [n]
           for zc in z.split(chunk)]
    return torch.cat(out) if out else z.new_zeros(0, dtype=torch.long)


def kmeans(
    x: torch.Tensor, k: int, iters: int, cosine: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Lloyd's k-means of ``x [N, D]`` into ``k`` centres ``[k, D]`` (spherical when ``cosine``).

    k-means++ seeding (each new centre drawn with probability ~ squared distance to the nearest
    chosen one), so well-separated clusters each get a centre; an empty cluster keeps its centre.
    """
    n = x.shape[0]
    first = torch.randint(n, (1,), device=x.device, generator=generator)
    centres = [x[first]]  # list of [1, D]
    d2 = (x - centres[0]).pow(2).sum(1)  # [N] squared distance to the nearest centre so far
    for _ in range(k - 1):
        if d2.sum() > 0:
            pick = torch.multinomial(d2, 1, generator=generator)
        else:  # fewer distinct points than codes: repeat random ones
            pick = torch.randint(n, (1,), device=x.device, generator=generator)
        centres.append(x[pick])
        d2 = torch.minimum(d2, (x - centres[-1]).pow(2).sum(1))
    c = torch.cat(centres)  # [k, D]
    for _ in range(iters):
        assign = nearest_code(x, c)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        if cosine:
            c = F.normalize(c, dim=1)
    return c


# ----------------------------------------------------------------------------- quantizer


@dataclass
class QuantizerOutput:
    """What `VectorQuantizer.forward` returns.

    Attributes:
        quantized: ``[B, D, h, w]`` codes in the input's layout and dtype, with the straight-through
            gradient to the input.
        codes: ``LongTensor[B, h, w]`` code indices.
        loss: ``codebook_loss + beta * commitment_loss`` (fp32 scalar); LFQ weighs its
            ``codebook_loss`` by ``entropy_weight``.
        codebook_loss: the term that trains the codes: ``||sg[z] - e||^2`` (VQ, SimVQ); zero with
            EMA updates (the EMA moves the codes) and for FSQ; LFQ's entropy penalty.
        commitment_loss: ``||z - sg[e]||^2`` (unweighted).
        perplexity: ``exp(entropy)`` of this batch's code histogram (all ranks when distributed).
        usage: fraction of codes picked at least once in the rolling window of training latents
            (`CodeUsage`).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


NEVER = -(2**62)  # clock reading of a pick that never happened


class CodeUsage(nn.Module):
    """Which codes training picked recently (summed over all ranks): every quantizer's rolling
    usage figure and `VectorQuantizer`'s dead-code test.

    The window is the last ``tokens_per_code * K`` training latents of all ranks together, so a
    code used as often as the others is seen ``tokens_per_code`` times in it at any codebook size,
    batch size or process count. A fixed number of batches does not scale: 20 batches of 1024
    latents are 20 latents per code at K = 1024 but 1.25 at K = 16,384, where a code drawn at its
    uniform share is missed by chance (e^-1.25 = 29% of the time) and restarted; see
    docs/tokenizer.md. ``window_batches`` (configs saved with ``usage_window``) keeps that older
    window of the last that many batches instead: the clock then counts batches, not latents.

    Instead of a ``[window, K]`` histogram the statistics are the clock reading of each code's
    ``picks`` most recent picks, ``[K, picks]``: O(K) memory at any window. A batch's picks read
    the clock at the batch's end, so the window holds whole batches: those that ended fewer than
    ``window`` latents ago (always the current one). A code had fewer than ``picks`` picks in the
    window exactly when its oldest kept reading lies before it. Rebuilt after a load, not saved.
    """

    clock: torch.Tensor  # [] training latents seen (training batches with ``window_batches``)
    recent_picks: torch.Tensor  # [K, picks] clock readings of each code's latest picks, newest first

    def __init__(self, codebook_size: int, tokens_per_code: float = 4.0, window_batches: int | None = None,
                 picks: int = 1):
        super().__init__()
        if window_batches is None and not tokens_per_code > 0:
            raise ValueError(f"usage_tokens_per_code must be > 0, got {tokens_per_code}")
        if window_batches is not None and window_batches < 1:
            raise ValueError(f"usage_window (batches) must be >= 1 or None, got {window_batches}")
        self.codebook_size, self.tokens_per_code, self.window_batches = codebook_size, tokens_per_code, window_batches
        # the window in clock units: batches, or latents
        self.window = window_batches or max(1, math.ceil(tokens_per_code * codebook_size))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("recent_picks", torch.full((codebook_size, picks), NEVER), persistent=False)

    @torch.no_grad()
    def reset_statistics(self) -> None:
        """Forget the usage record."""
        self.clock.zero_()
        self.recent_picks.fill_(NEVER)

    @property
    def usage(self) -> torch.Tensor:
        """Fraction of codes picked at least once in the window."""
        return (self.recent_picks[:, 0] > self.clock - self.window).float().mean()

    def underused(self) -> torch.Tensor:
        """``[K]`` bool: codes picked fewer than ``picks`` times in the window."""
        return self.recent_picks[:, -1] <= self.clock - self.window

    @torch.no_grad()
    def count(self, codes: torch.Tensor, training: bool) -> torch.Tensor:
        """Histogram ``[K]`` of ``codes`` (any shape); in training summed over ranks and recorded."""
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size)
        if training:
            all_reduce_sum_(counts)  # every rank sees the global histogram
            self.clock += 1 if self.window_batches else counts.sum()
            # shift each code's readings right by its picks this batch (at most `picks`), newest first
            c = counts.clamp(max=self.recent_picks.shape[1]).unsqueeze(1)  # [K, 1]
            j = torch.arange(self.recent_picks.shape[1], device=codes.device)  # [picks]
            older = self.recent_picks.gather(1, (j - c).clamp(min=0))
            self.recent_picks.copy_(torch.where(j < c, self.clock, older))
        return counts

    def output(self, quantized: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor, codebook_loss: torch.Tensor,
               commitment_loss: torch.Tensor, loss: torch.Tensor) -> QuantizerOutput:
        """Assemble the `QuantizerOutput` of one batch (perplexity from ``counts [K]``)."""
        return QuantizerOutput(quantized=quantized, codes=codes, loss=loss, codebook_loss=codebook_loss,
                               commitment_loss=commitment_loss, perplexity=code_perplexity(counts.float()),
                               usage=self.usage)

    @staticmethod
    def flatten(z: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w]`` latents -> ``[B*h*w, D]`` fp32."""
        return z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    @staticmethod
    def unflatten(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[B*h*w, D]`` -> ``[B, D, h, w]`` in the layout (not dtype) of ``like``."""
        b, d, h, w = like.shape
        return flat.view(b, h, w, d).permute(0, 3, 1, 2)


class VectorQuantizer(CodeUsage):
    """Codebook of ``codebook_size`` vectors of size ``dim``; see the module docstring.

    Args:
        codebook_size: number of codes K.
        dim: size D of each code (= channels of the latents it quantises).
        beta: commitment loss weight.
        use_l2_norm: normalise latents and codes to unit length before the lookup (LlamaGen).
        ema_decay: update codes as an EMA of their assigned latents (no codebook loss); None = off.
        kmeans_init: set the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations for that.
        dead_code_threshold: restart codes picked fewer times than this in the rolling window
            (and not restarted within it); 0 = off.
        usage_tokens_per_code: the window, in training latents per code: the last
            ``usage_tokens_per_code * codebook_size`` latents (`CodeUsage`).
        usage_window: if set, the window is the last this many training batches instead (the rule
            of configs saved before ``usage_tokens_per_code``).
    """

    # Buffers registered in __init__ (the EMA ones only with ``ema_decay``, ``initted`` only with
    # ``kmeans_init``).
    ema_cluster_size: torch.Tensor
    ema_embed_sum: torch.Tensor
    initted: torch.Tensor
    restarted_at: torch.Tensor

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        use_l2_norm: bool = False,
        ema_decay: float | None = None,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: int = 0,
        usage_tokens_per_code: float = 4.0,
        usage_window: int | None = None,
    ):
        super().__init__(codebook_size, usage_tokens_per_code, usage_window, picks=max(1, dead_code_threshold))
        self.dim, self.beta = dim, beta
        self.use_l2_norm, self.ema_decay = use_l2_norm, ema_decay
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.embedding = nn.Embedding(codebook_size, dim)  # taming's name: quantize.embedding.weight
        if ema_decay is not None:
            # The EMA owns the codebook; gradients would fight it.
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))  # [K] decayed counts
            self.register_buffer("ema_embed_sum", torch.zeros(codebook_size, dim))  # [K, D] decayed sums
        if kmeans_init:
            self.register_buffer("initted", torch.tensor(False))  # saved: a loaded codebook is not re-initialised
        # Clock reading of each code's last restart; like the usage record, rebuilt after a load.
        self.register_buffer("restarted_at", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """taming's init: codes uniform in ``[-1/K, 1/K]``; EMA sums start at the codes.

        Tensors that ``from_pretrained`` loaded are left as loaded (see the ``init`` import).
        """
        init.uniform_(self.embedding.weight, -1.0 / self.codebook_size, 1.0 / self.codebook_size)
        if self.ema_decay is not None:
            init.ones_(self.ema_cluster_size)
            init.copy_(self.ema_embed_sum, self.embedding.weight)
        if self.kmeans_init:
            init.zeros_(self.initted)
        self.reset_statistics()

    @torch.no_grad()
    def reset_statistics(self) -> None:
        """Forget the usage record and restart history."""
        super().reset_statistics()
        self.restarted_at.zero_()

    def codebook(self) -> torch.Tensor:
        """The codes as used for lookup, fp32 ``[K, D]`` (unit length with ``use_l2_norm``)."""
        e = self.embedding.weight.float()
        # normalize() saves its input for backward; a clone keeps that input intact when a restart
        # later overwrites rows of the weight in place during the same step.
        return F.normalize(e.clone(), dim=1) if self.use_l2_norm else e

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of latents ``z [B, D, h, w]`` -> ``LongTensor[B, h, w]``; updates no statistics."""
        with torch.autocast(z.device.type, enabled=False):
            flat = self._flatten(z)
            return nearest_code(flat, self.codebook()).view(z.shape[0], *z.shape[2:])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``LongTensor[B, h, w]`` -> latents ``[B, D, h, w]`` (fp32)."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise latents ``z [B, D, h, w]``; in training mode also update codebook statistics."""
        b, d, h, w = z.shape
        if d != self.dim:
            raise ValueError(f"expected latents with {self.dim} channels, got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            flat = self._flatten(z)  # [N, D] fp32, N = B*h*w
            if self.training and self.kmeans_init and not bool(self.initted):
                self._kmeans_init(flat.detach())
            codebook = self.codebook()  # [K, D]
            codes = nearest_code(flat.detach(), codebook.detach())  # [N]
            zq = codebook[codes]  # [N, D]; indexing saves only `codes` for backward
            commitment = F.mse_loss(flat, zq.detach())
            codebook_loss = F.mse_loss(zq, flat.detach()) if self.ema_decay is None else flat.new_zeros(())
            counts = self.count(codes, self.training)  # [K], summed over ranks in training
            if self.training:
                self._update_statistics(flat.detach(), codes, counts)
            perplexity = code_perplexity(counts.float())
            # straight-through: forward value zq, gradient of the identity to z
            st = flat + (zq - flat).detach()
        quantized = st.view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)  # [B, D, h, w]
        return QuantizerOutput(
            quantized=quantized,
            codes=codes.view(b, h, w),
            loss=codebook_loss + self.beta * commitment,
            codebook_loss=codebook_loss,
            commitment_loss=commitment,
            perplexity=perplexity,
            usage=self.usage,
        )

    # ------------------------------------------------------------------ internals

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:  # [B, D, h, w] -> [B*h*w, D] fp32
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return F.normalize(flat, dim=1) if self.use_l2_norm else flat

    @torch.no_grad()
    def _set_codes(self, index: torch.Tensor, vectors: torch.Tensor) -> None:
        """Overwrite codes ``index`` with ``vectors [n, D]`` (and restart their EMA state)."""
        self.embedding.weight[index] = vectors.to(self.embedding.weight.dtype)
        if self.ema_decay is not None:
            self.ema_cluster_size[index] = 1.0
            self.ema_embed_sum[index] = vectors

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        # k-means on rank 0's batch, broadcast so every rank starts from the same codebook.
        centres = torch.empty(self.codebook_size, self.dim, device=flat.device)
        if _is_rank0():
            centres = kmeans(flat, self.codebook_size, self.kmeans_iters, cosine=self.use_l2_norm)
        broadcast_(centres)
        self._set_codes(torch.arange(self.codebook_size, device=flat.device), centres)
        self.initted.fill_(True)

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA codebook update and dead-code restart, after one training batch (recorded by `count`)."""
        if self.ema_decay is not None:
            sums = torch.zeros(self.codebook_size, self.dim, device=flat.device).index_add_(0, codes, flat)
            all_reduce_sum_(sums)  # [K, D] summed latents per code over all ranks
            self.ema_cluster_size.lerp_(counts.float(), 1 - self.ema_decay)
            self.ema_embed_sum.lerp_(sums, 1 - self.ema_decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            n = self.ema_cluster_size.sum()
            size = (self.ema_cluster_size + 1e-5) / (n + self.codebook_size * 1e-5) * n
            self.embedding.weight.copy_(self.ema_embed_sum / size.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        # Judged over a full window, counted from the start or from the code's last restart.
        dead = self.underused() & (self.clock - self.restarted_at >= self.window)
        dead_idx = dead.nonzero().squeeze(1)  # identical on all ranks: usage is all-reduced
        if dead_idx.numel() == 0:
            return
        vectors = torch.empty(dead_idx.numel(), self.dim, device=flat.device)
        if _is_rank0():
            vectors = flat[torch.randint(flat.shape[0], (dead_idx.numel(),), device=flat.device)]
        broadcast_(vectors)  # rank 0's latents replace the dead codes everywhere
        self._set_codes(dead_idx, vectors)
        self.restarted_at[dead_idx] = self.clock
