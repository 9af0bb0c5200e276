"""Gradient checkpointing with each MLP's backward run a chunk of tokens at a time.

Under gradient checkpointing a decoder layer runs again in backward, and its MLP's intermediates
then exist for every token of the batch at once: at Qwen2.5-0.5B's shape (4 x 1,100 tokens, MLP
4864) the gate, up, activation and product are four [4400, 4864] fp32 tensors and their gradients,
580 MB of the layer's 675 MB backward (measured). The step's peak is near the first layer's backward
(by then every gradient exists), so that transient is on top of weights, gradients and Adam state.
`chunk_mlps` makes each MLP keep only its input [N, H] and recompute its intermediates
``chunk_size`` tokens at a time in backward: the layer's backward 100 MB at 1,024 tokens, same
values and gradients.

No extra compute where nothing after the MLP saves its output (Llama, Qwen2, Mistral, Phi-3,
GPT-2 layers: only the residual add follows): the input is saved by its own op (`_SaveInput`), and
checkpoint's early stop ends the layer's recomputation there, before the MLP, so the MLP runs twice
per step as before (the forward, then chunk by chunk in backward). Where an op after the MLP saves
its output (Gemma2/3's post-feed-forward norm), the recomputation also runs the MLP (chunked,
without intermediates): still exact, one MLP forward slower.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MLP_CHUNK_SIZE = 1024  # tokens per chunk: [1024, H] x [H, 4H] products still run at full speed


class _SaveInput(torch.autograd.Function):
    """Saves ``x`` through whatever saved-tensor hooks are active (checkpoint's, under gradient
    checkpointing) and returns an empty tensor whose ``grad_fn`` gives it back to `_ChunkedMLP`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:
        return None


class _ChunkedMLP(torch.autograd.Function):
    """``forward(x [N, H]) -> [N, H]`` without saving anything; backward recomputes each chunk of
    tokens with gradients on and returns the input's and the parameters' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, link: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                chunk_size: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.saved_input = link.grad_fn  # _SaveInput's node holds x; nothing saved here
        ctx.forward, ctx.chunk_size, ctx.params = forward, chunk_size, params
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return torch.cat([forward(chunk) for chunk in x.split(chunk_size)])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_input.saved_tensors  # under checkpointing: recomputes the layer up to here
        device, enabled, dtype = ctx.autocast
        grad_x = torch.empty_like(x)
        grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            for start in range(0, x.shape[0], ctx.chunk_size):
                chunk = x[start:start + ctx.chunk_size].detach().requires_grad_()
                out = ctx.forward(chunk)
                got = torch.autograd.grad(out, (chunk, *ctx.params), grad_out[start:start + ctx.chunk_size],
                                          allow_unused=True)
                grad_x[start:start + ctx.chunk_size] = got[0]
                for i, (g, total) in enumerate(zip(got[1:], grads, strict=True)):
                    if g is not None:
                        grads[i] = g if total is None else total.add_(g)
        return grad_x, None, None, None, *grads


def chunked_forward(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                    chunk_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` (a token-wise module's own) with its backward in chunks of ``chunk_size`` tokens.
    Runs ``forward`` as is where chunks would not help or would not work: no gradients, at most one
    chunk of tokens, an active dropout (a recomputed chunk would draw another mask), or DeepSpeed
    ZeRO-3 weights (its hooks gather them for the module's own forward and backward, not for a
    recomputation inside that backward)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        dropout = module.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
        zero3 = any(hasattr(p, "ds_id") for p in module.parameters())  # a ZeRO-3-partitioned parameter
        tokens = x.numel() // x.shape[-1]
        if not torch.is_grad_enabled() or not x.requires_grad or tokens <= chunk_size or dropout or zero3:
            return forward(x)
        params = tuple(p for p in module.parameters() if p.requires_grad)
        flat = x.reshape(tokens, x.shape[-1])  # [N, H]
        out = _ChunkedMLP.apply(flat, _SaveInput.apply(flat), forward, chunk_size, *params)
        return out.view(*x.shape[:-1], out.shape[-1])

    return run


def chunk_mlps(model: nn.Module, chunk_size: int = MLP_CHUNK_SIZE) -> int:
    """Give every checkpointed decoder layer's dense MLP (its ``mlp`` child, a class named
    ``...MLP``: mixture-of-experts blocks return router outputs and are left alone) a backward in
    chunks of ``chunk_size`` tokens. Call it after ``gradient_checkpointing_enable``; LoRA may wrap
    the MLP's linears before or after. Returns the number of MLPs changed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
    changed = 0
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if isinstance(layer, GradientCheckpointingLayer) and isinstance(mlp, nn.Module) \
                and type(mlp).__name__.endswith("MLP"):
            mlp.forward = chunked_forward(mlp, mlp.forward, chunk_size)  # nn.Module.__call__ hooks still run
            changed += 1
    return changed
