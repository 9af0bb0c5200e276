"""Linear + cross-entropy in chunks, with the gradients taken during the forward (a leaf).

For a plain ``nn.Linear`` head, ``sum_i CE(transform(h_i W^T + b), t_i)`` over N target positions
is computed ``chunk`` rows at a time; while a chunk's [chunk, V] logits exist, their softmax gives
the gradients of the sum with respect to the hidden states (dL/dh = G W, [N, H]) and the head
(dL/dW = G^T h, [V, H]; dL/db = sum G), where G = softmax - onehot, chained through the logit
transforms. Backward then only scales them by the incoming gradient (the sum is a scalar).

Against checkpointing each chunk (recompute its logits in backward, then two matmuls) that saves
one of the head's three matmuls over the target positions and never keeps any logits: the same
idea as Liger-Kernel's fused linear cross-entropy, here in plain torch so it runs on every device.

A tied input embedding (Qwen2.5, Gemma, SmolLM2) shares the head's weight: autograd would add its
gradient ([V, H] dense, built at the very end of backward when every other gradient exists) to the
head's, a second [V, H] fp32 block at the step's peak (573 MB at 160k x 896). `TiedGrad` hands the
head's gradient to the embedding's backward (`tied_embedding`), which adds its rows into it in
place and returns it as the weight's only gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Post-head logit transforms, applied in this order, each (op, value): ("mul"|"div"|"softcap", v).
Steps = tuple[tuple[str, float], ...]


def transform_logits(steps: Steps, logits: Tensor) -> Tensor:
    """What a model's forward does to ``head(hidden)``: the same operations in the same dtype and
    order (e.g. Gemma 2 softcaps in the model dtype), so fp32 results match it exactly."""
    for op, value in steps:
        if op == "mul":
            logits = logits * value
        elif op == "div":
            logits = logits / value
        else:  # softcap: cap * tanh(logits / cap)
            logits = torch.tanh(logits / value) * value
    return logits


def _transform_grad(steps: Steps, logits: Tensor, grad: Tensor) -> Tensor:
    """Chain ``grad`` (d loss / d transformed logits, fp32 [n, V]) back through ``steps`` to the
    head's raw ``logits`` [n, V]; in place where it can."""
    if not steps:
        return grad
    values = [logits]
    for i in range(len(steps) - 1):  # the input of each step (only softcap needs it)
        values.append(transform_logits(steps[i:i + 1], values[-1]))
    for (op, value), x in zip(reversed(steps), reversed(values), strict=True):
        if op == "mul":
            grad.mul_(value)
        elif op == "div":
            grad.div_(value)
        else:  # d/dx cap * tanh(x / cap) = 1 - tanh(x / cap)^2
            grad.mul_(1 - torch.tanh(x.float() / value).square())
    return grad


def _losses_and_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                      steps: Steps, chunk: int, need: tuple[bool, bool, bool]):
    """Token losses [N] fp32 and, where ``need`` says (hidden, weight, bias), the gradients of
    their sum: [N, H] in hidden's dtype, [V, H] and [V] in fp32 (the chunks add up in fp32)."""
    losses = torch.empty(len(targets), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need[2] and bias is not None else None
    for start in range(0, len(targets), chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]  # [n, H], [n]
        raw = F.linear(h, weight, bias)  # [n, V], in the model's (or autocast's) dtype
        z = transform_logits(steps, raw).float()  # a new tensor, or raw itself (fp32, no steps)
        target = z.gather(1, t[:, None]).squeeze(1)  # [n]
        # logsumexp and softmax in z's buffer (torch.logsumexp would allocate another [n, V]); raw
        # is read again only when there are steps, and then z is not raw.
        peak = z.amax(dim=-1)  # [n]
        e = z.sub_(peak[:, None]).exp_()  # [n, V] exp(z - max)
        total = e.sum(dim=-1)  # [n]
        losses[start:start + chunk] = total.log() + peak - target
        if not any(need):
            continue
        g = e.div_(total[:, None])  # G = softmax(z) - onehot(t) = d loss / d z
        g[torch.arange(len(t), device=g.device), t] -= 1
        g = _transform_grad(steps, raw, g).to(raw.dtype)  # the dtype the head's backward would use
        if grad_hidden is not None:
            grad_hidden[start:start + chunk] = g @ weight.to(g.dtype)
        if grad_weight is not None and g.dtype == grad_weight.dtype:
            grad_weight.addmm_(g.t(), h)  # in place: no [V, H] temporary per chunk
        elif grad_weight is not None:  # bf16 / fp16 logits: their product, added up in fp32
            grad_weight += g.t() @ h.to(g.dtype)
        if grad_bias is not None:
            grad_bias += g.sum(0)
    return losses, (grad_hidden, grad_weight, grad_bias)


class TiedGrad:
    """The fused head's weight gradient on its way to the tied embedding's backward (one forward).

    ``embedded``: the embedding ran in this forward (so its backward will run after the head's and
    take the gradient); only then does the head hand it over instead of returning it."""

    def __init__(self) -> None:
        self.embedded = False
        self.grad: Tensor | None = None

    def take(self) -> Tensor | None:
        grad, self.grad = self.grad, None
        return grad


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None, tied: TiedGrad) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.tied, ctx.shape = padding_idx, tied, weight.shape
        tied.embedded = True
        return F.embedding(ids, weight, padding_idx)  # [..., H]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])  # [n], [n, H]
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            rows = rows.masked_fill((ids == ctx.padding_idx)[:, None], 0)
        grad = ctx.tied.take()  # [V, H], the head's (None: it was not handed over)
        if grad is None:
            grad = rows.new_zeros(ctx.shape)
        return None, grad.index_add_(0, ids, rows.to(grad.dtype)), None, None


def tied_embedding(embedding: torch.nn.Embedding, tied: TiedGrad):
    """A ``forward`` for ``embedding`` (a plain ``nn.Embedding`` without max_norm or
    scale_grad_by_freq) whose backward adds into the head gradient that ``tied`` carries."""
    return lambda ids: _TiedEmbedding.apply(ids, embedding.weight, embedding.padding_idx, tied)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                steps: Steps, chunk: int, tied: TiedGrad | None) -> tuple[Tensor, Tensor]:
        # -> (sum of token losses [] fp32, token losses [N] fp32, not differentiable)
        losses, grads = _losses_and_grads(hidden, weight, bias, targets, steps, chunk,
                                          tuple(ctx.needs_input_grad[:3]))
        ctx.mark_non_differentiable(losses)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.tied = tied if tied is not None and tied.embedded else None
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_losses: Tensor):
        # grad_total: [] (e.g. 1 / number of target tokens). Scaled in place: the engine frees the
        # saved tensors after this node, so the returned ones become .grad without a copy.
        out = [None if saved is None else saved.mul_(grad_total.to(saved.dtype)).to(dtype)
               for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)]
        if ctx.tied is not None:  # the tied embedding's backward (later) adds to it and returns it
            ctx.tied.grad, out[1] = out[1], None
        return out[0], out[1], out[2], None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         steps: Steps = (), chunk: int = 1024,
                         tied: TiedGrad | None = None) -> tuple[Tensor, Tensor]:
    """``(sum of token losses [] fp32, token losses [N] fp32, detached)`` of a Linear head
    (``weight`` [V, H], ``bias`` [V] or None) over ``hidden`` [N, H] and ``targets`` [N] (all
    valid, no -100), ``chunk`` rows at a time; gradients flow to hidden, weight and bias
    (``tied``: the weight's through the tied embedding of this forward, see `TiedGrad`)."""
    chunk = max(1, int(chunk))
    if not torch.is_grad_enabled():
        losses, _ = _losses_and_grads(hidden, weight, bias, targets, steps, chunk, (False, False, False))
        return losses.sum(), losses
    total, losses = _LinearCrossEntropy.apply(hidden, weight, bias, targets, steps, chunk, tied)
    return total, losses
