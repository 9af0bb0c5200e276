"""Quantizers with an implicit codebook: FSQ and LFQ (no learned codes, so none can die).

* FSQ ("Finite Scalar Quantization: VQ-VAE made simple", Mentzer et al. 2023; Cosmos tokenizer):
  each of the ``d`` latent channels is squashed by ``tanh`` and rounded to one of ``levels[i]``
  values in ``[-1, 1]``; the code is the mixed-radix number of those digits, so there are
  ``prod(levels)`` codes (``[8, 8, 8, 5, 5, 5]`` = 64,000) and no codebook loss at all.
* LFQ ("lookup-free quantization", MAGVIT-v2 / Open-MAGVIT2): each of ``d = log2(K)`` channels
  becomes its sign, the code is the binary number of the bits; an entropy penalty makes every
  token confident (low per-token entropy) and the batch use all codes (high codebook entropy).

The maths (bounds, offsets, index order) is `vector_quantize_pytorch`'s ``FSQ`` / ``LFQ``, and
tests/test_quantizer_implicit.py checks the codes are identical. Ours adds what that library does
not have and `VQGAN` needs: usage / perplexity statistics all-reduced across ranks, fp32 under any
autocast (the library only turns off CUDA autocast), ``codebook()`` for codebook-initialised LM
rows, and `QuantizerOutput`. LFQ's entropies are the library's, exactly, but its ``[N, K]``
probabilities (4 GB per 16k latents at ``K = 65,536``) become two ``[N, sqrt(K)]`` halves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quantizer import CodeUsage, QuantizerOutput


class FSQuantizer(CodeUsage):
    """Finite scalar quantization of ``len(levels)``-channel latents into ``prod(levels)`` codes.

    Args:
        levels: values per channel, each >= 3 (e.g. ``[8, 5, 5, 5]`` = 1000 codes).
        usage_tokens_per_code, usage_window: the rolling usage window (`CodeUsage`).
    """

    levels: torch.Tensor
    basis: torch.Tensor

    def __init__(self, levels: list[int] | tuple[int, ...], usage_tokens_per_code: float = 4.0,
                 usage_window: int | None = None):
        super().__init__(math.prod(levels), usage_tokens_per_code, usage_window)
        self.dim, self.level_list = len(levels), list(levels)
        # Derived constants, rebuilt from the config: not saved.
        self.register_buffer("levels", torch.empty(self.dim, dtype=torch.long), persistent=False)  # [d]
        self.register_buffer("basis", torch.empty(self.dim, dtype=torch.long), persistent=False)  # [d]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Nothing is learned: (re)compute the constants (``from_pretrained`` leaves unsaved buffers
        uninitialised) and restart the statistics."""
        levels = torch.tensor(self.level_list)
        self.levels.copy_(levels)
        self.basis.copy_(torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0))  # first digit lowest
        self.reset_statistics()

    def _bound(self, flat: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` -> values in ``(-L/2, L/2)`` whose rounding gives ``L`` integers per channel
        (an even ``L`` is shifted by half a step so its ``L`` values are ``-L/2 .. L/2 - 1``)."""
        half_l = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(flat + shift) * half_l - offset

    def _digits(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[...]`` -> per-channel digits ``[..., d]`` in ``[0, L)``."""
        return (codes.unsqueeze(-1) // self.basis) % self.levels

    def _to_codes(self, rounded: torch.Tensor) -> torch.Tensor:
        """Rounded ``[N, d]`` values in ``[-L//2, ...]`` -> codes ``[N]``."""
        return ((rounded.long() + self.levels // 2) * self.basis).sum(-1)

    def codebook(self) -> torch.Tensor:
        """Every code's latent, fp32 ``[K, d]`` in ``[-1, 1]`` (a grid: nearby codes differ in one digit)."""
        return self._values(self._digits(torch.arange(self.codebook_size, device=self.levels.device)))

    def _values(self, digits: torch.Tensor) -> torch.Tensor:  # [..., d] digits -> latents in [-1, 1]
        half_width = self.levels // 2
        return (digits - half_width).float() / half_width

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of latents ``z [B, d, h, w]`` -> ``LongTensor[B, h, w]``; updates no statistics."""
        with torch.autocast(z.device.type, enabled=False):
            return self._to_codes(self._bound(self.flatten(z)).round()).view(z.shape[0], *z.shape[2:])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``LongTensor[B, h, w]`` -> latents ``[B, d, h, w]`` (fp32)."""
        return self._values(self._digits(codes)).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z [B, d, h, w]``: rounding with a straight-through gradient; no loss."""
        if z.shape[1] != self.dim:
            raise ValueError(f"expected latents with {self.dim} channels, got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(self.flatten(z))  # [N, d]
            rounded = bounded.round()
            codes = self._to_codes(rounded.detach())  # [N]
            st = (bounded + (rounded - bounded).detach()) / (self.levels // 2)  # straight-through round
            counts = self.count(codes, self.training)
            zero = st.new_zeros(())
        quantized = self.unflatten(st, z).to(z.dtype)
        return self.output(quantized, codes.view(z.shape[0], *z.shape[2:]), counts, zero, zero, zero)


def _binary_entropy(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Entropy in nats of Bernoulli(p), elementwise. The clamp inside the logs (the library's
    ``eps``) keeps the gradient finite where a sharp sigmoid saturates to exactly 0 or 1."""
    return -(p * p.clamp(min=eps).log() + (1 - p) * (1 - p).clamp(min=eps).log())


def _pattern_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities of all ``2^h`` bit patterns (first bit most significant) under independent
    bits with ``logits [N, h]`` -> ``[N, 2^h]`` (``[N, 1]`` of ones for ``h = 0``)."""
    h = logits.shape[1]
    shifts = torch.arange(h - 1, -1, -1, device=logits.device)
    bits = ((torch.arange(2**h, device=logits.device).unsqueeze(1) >> shifts) & 1).float()  # [2^h, h]
    log_p = F.logsigmoid(logits) @ bits.t() + F.logsigmoid(-logits) @ (1 - bits).t()  # [N, 2^h]
    return log_p.exp()


class LookupFreeQuantizer(CodeUsage):
    """Lookup-free quantization of ``log2(K)``-channel latents to ``K`` binary codes.

    Args:
        codebook_size: K, a power of two; the latents have ``log2(K)`` channels.
        beta: weight of the commitment loss ``||z - sg[sign(z)]||^2``.
        entropy_weight: weight of the entropy penalty.
        diversity_gamma: weight of the codebook entropy inside that penalty
            (``per-token entropy - gamma * codebook entropy``).
        inv_temperature: sharpness of the soft assignment the entropies are measured on
            (``p(bit = 1) = sigmoid(4 * inv_temperature * z)``, the softmax over the ``K`` codes).
        usage_tokens_per_code, usage_window: the rolling usage window (`CodeUsage`).
    """

    bit_values: torch.Tensor

    def __init__(self, codebook_size: int, beta: float = 0.25, entropy_weight: float = 0.1,
                 diversity_gamma: float = 1.0, inv_temperature: float = 100.0, usage_tokens_per_code: float = 4.0,
                 usage_window: int | None = None):
        super().__init__(codebook_size, usage_tokens_per_code, usage_window)
        self.dim = int(math.log2(codebook_size))
        if 2 ** self.dim != codebook_size:
            raise ValueError(f"LFQ needs a power-of-two codebook_size, got {codebook_size}")
        self.beta, self.entropy_weight = beta, entropy_weight
        self.diversity_gamma, self.inv_temperature = diversity_gamma, inv_temperature
        self.register_buffer("bit_values", torch.empty(self.dim, dtype=torch.long), persistent=False)  # [d]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Nothing is learned: (re)compute the bit values (``from_pretrained`` leaves unsaved
        buffers uninitialised) and restart the statistics."""
        # the first channel is the most significant bit (the library's order)
        self.bit_values.copy_(2 ** torch.arange(self.dim - 1, -1, -1))
        self.reset_statistics()

    def _signs(self, codes: torch.Tensor) -> torch.Tensor:  # codes [...] -> +-1 latents [..., d] (fp32)
        return ((codes.unsqueeze(-1) & self.bit_values) != 0).float() * 2 - 1

    def codebook(self) -> torch.Tensor:
        """Every code's latent, fp32 ``[K, d]`` of +-1 (codes differing in one bit are neighbours)."""
        return self._signs(torch.arange(self.codebook_size, device=self.bit_values.device))

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of latents ``z [B, d, h, w]`` -> ``LongTensor[B, h, w]``; updates no statistics."""
        with torch.autocast(z.device.type, enabled=False):
            return ((self.flatten(z) > 0).long() * self.bit_values).sum(1).view(z.shape[0], *z.shape[2:])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``LongTensor[B, h, w]`` -> latents ``[B, d, h, w]`` of +-1 (fp32)."""
        return self._signs(codes).permute(0, 3, 1, 2).contiguous()

    def entropies(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-token entropy and codebook entropy of latents ``[N, d]``, in nats.

        The softmax over the ``K`` codes at ``-||z - c||^2 * inv_temperature`` is a product of one
        Bernoulli per bit (``(z - 1)^2 - (z + 1)^2 = -4 z``), so a token's entropy is the sum of
        its bits' entropies. The codebook entropy is that of the batch's mean soft assignment over
        all ``K`` codes, exactly as the library computes it: a bound from the bits' marginals
        instead let the codes collapse into a few patterns of correlated bits (2.7% usage at
        K = 1024 in benchmarks/tokenizer.py; each bit stays balanced). The product splits into the
        high and the low half of the bits, ``p[n, code] = A[n, high] * B[n, low]``, so the batch
        mean is one ``A^T B / N`` matmul: ``[N, 2^(d/2)]`` tensors, never an ``[N, K]`` one.
        """
        logits = 4 * self.inv_temperature * flat  # [N, d]: logit of bit = 1
        per_token = _binary_entropy(torch.sigmoid(logits)).sum(1).mean()
        high = self.dim // 2
        a, b = _pattern_probabilities(logits[:, :high]), _pattern_probabilities(logits[:, high:])
        mean = (a.t() @ b).flatten() / flat.shape[0]  # [K]: code = high * 2^(d - d/2) + low
        codebook = -(mean * mean.clamp(min=1e-5).log()).sum()  # the library's eps-clamped entropy
        return per_token, codebook

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z [B, d, h, w]`` to signs; in training also the entropy penalty.

        ``codebook_loss`` carries the (unweighted) entropy penalty, the term that spreads the codes.
        """
        if z.shape[1] != self.dim:
            raise ValueError(f"expected latents with {self.dim} channels, got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            flat = self.flatten(z)  # [N, d]
            signs = torch.where(flat > 0, 1.0, -1.0)
            codes = ((flat.detach() > 0).long() * self.bit_values).sum(1)  # [N]
            commitment = F.mse_loss(flat, signs)
            entropy_loss = flat.new_zeros(())
            if self.training:
                per_token, codebook = self.entropies(flat)
                entropy_loss = per_token - self.diversity_gamma * codebook
            st = flat + (signs - flat).detach()  # straight-through sign
            counts = self.count(codes, self.training)
        loss = self.entropy_weight * entropy_loss + self.beta * commitment
        quantized = self.unflatten(st, z).to(z.dtype)
        return self.output(quantized, codes.view(z.shape[0], *z.shape[2:]), counts, entropy_loss, commitment, loss)
