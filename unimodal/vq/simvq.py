"""SimVQ: a frozen random codebook behind one learned linear map (Zhu et al., "Addressing
Representation Collapse in Vector Quantized Models with One Linear Layer", 2024).

Plain VQ updates only the codes that were picked, so unpicked codes fall behind and die. SimVQ
keeps a frozen Gaussian codebook ``C [K, D]`` and learns ``W [D, D]``: the codes actually used
are ``E = C W^T``, and every gradient on any picked code moves ``W``, i.e. the whole codebook at
once (65k codes at 100% usage in the paper). Lookup, losses and straight-through are
`VectorQuantizer`'s (nearest code, ``||sg[z] - e||^2 + beta ||z - sg[e]||^2``), in fp32.

`vector_quantize_pytorch.SimVQ` is the same construction (with the rotation trick instead of the
straight-through copy by default); ours adds rank-synchronised usage statistics, fp32 under any
autocast, a codebook that `from_pretrained` restores, and `QuantizerOutput`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .quantizer import CodeUsage, QuantizerOutput, nearest_code


class SimVQuantizer(CodeUsage):
    """``codebook_size`` codes of size ``dim``: a frozen codebook times a learned linear map.

    Args:
        codebook_size: number of codes K.
        dim: size D of each code.
        beta: commitment loss weight.
        usage_tokens_per_code, usage_window: the rolling usage window (`CodeUsage`).
    """

    frozen_codebook: torch.Tensor

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, usage_tokens_per_code: float = 4.0,
                 usage_window: int | None = None):
        super().__init__(codebook_size, usage_tokens_per_code, usage_window)
        self.dim, self.beta = dim, beta
        # Saved (persistent) though never trained: the codes are C W^T, so C is part of the model.
        self.register_buffer("frozen_codebook", torch.empty(codebook_size, dim))  # [K, D]
        self.transform = nn.Linear(dim, dim, bias=False)  # W
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``C ~ N(0, 1/D)`` (unit-length codes on average) and ``nn.Linear``'s init of ``W``.

        Tensors that ``from_pretrained`` loaded are left as loaded (transformers' init functions).
        """
        init.normal_(self.frozen_codebook, std=self.dim ** -0.5)
        init.kaiming_uniform_(self.transform.weight, a=math.sqrt(5))
        self.reset_statistics()

    def codebook(self) -> torch.Tensor:
        """The codes as used for lookup, ``C W^T``: fp32 ``[K, D]``."""
        with torch.autocast(self.frozen_codebook.device.type, enabled=False):
            return self.transform(self.frozen_codebook.float())

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of latents ``z [B, D, h, w]`` -> ``LongTensor[B, h, w]``; updates no statistics."""
        with torch.autocast(z.device.type, enabled=False):
            return nearest_code(self.flatten(z), self.codebook()).view(z.shape[0], *z.shape[2:])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``LongTensor[B, h, w]`` -> latents ``[B, D, h, w]`` (fp32)."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z [B, D, h, w]``; the codebook loss trains ``W`` (hence every code)."""
        if z.shape[1] != self.dim:
            raise ValueError(f"expected latents with {self.dim} channels, got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            flat = self.flatten(z)  # [N, D]
            codebook = self.codebook()  # [K, D], differentiable in W
            codes = nearest_code(flat.detach(), codebook.detach())  # [N]
            zq = codebook[codes]  # [N, D]
            commitment = F.mse_loss(flat, zq.detach())
            codebook_loss = F.mse_loss(zq, flat.detach())
            st = flat + (zq - flat).detach()  # straight-through
            counts = self.count(codes, self.training)
        quantized = self.unflatten(st, z).to(z.dtype)
        return self.output(quantized, codes.view(z.shape[0], *z.shape[2:]), counts, codebook_loss, commitment,
                           codebook_loss + self.beta * commitment)
