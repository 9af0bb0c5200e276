"""Causal-LM loss that applies the output head only where a label is taken.

``model(input_ids, labels=labels).loss`` builds [B, T, V] logits (plus an fp32 copy and the
softmax kept for backward): at V = 160k that dwarfs a small model, and in image-to-text batches
most positions have no label. Here the model's own forward runs with its output head swapped for
a stand-in that takes the last hidden states [B, T, H], keeps the N positions whose shifted label
is not -100 ([N, H]) and computes the cross-entropy ``chunk_size`` rows at a time: at most one
[chunk_size, V] block of logits lives, forward or backward. A plain ``nn.Linear`` head (full
fine-tunes, DDP, ZeRO-1/2, FSDP) takes its gradients while each chunk's logits exist
(`linear_ce`: three matmuls over the targets, as the model's own loss, none recomputed; a tied
input embedding adds its rows into that [V, H] gradient in place, `_tied_forwards`); a head
under PEFT or partitioned by ZeRO-3 is called chunk by chunk under ``torch.utils.checkpoint``
(its own forward and hooks run, backward recomputes one chunk's logits at a time).

Running the model's forward (not its backbone alone) keeps what the model does before the head
and keeps the call inside DDP / DeepSpeed / FSDP wrappers, accelerate's autocast and PEFT. The head
stays in the module tree: only its instance's ``forward`` is swapped for the one call, so the hooks
wrappers put on the head (ZeRO-3 gather / release, FSDP2 unshard) fire around the stand-in and the
head's submodules see what they would see in the model's own forward (see `_with_head`). Logit
transforms after the head (softcapping, scaling) are reproduced from the config, and a one-time
probe checks that the model's forward and loss agree with ours; other models are refused with a
`ValueError` asking for ``loss: model`` in the recipe config.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from ..extend import layer_rows
from .linear_ce import Steps, TiedGrad, linear_cross_entropy, tied_embedding, transform_logits
from .loss_choice import chunked_loss_refusal, resolve_loss_method

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Default chunk: at most this many logits (fp32: 256 MB) per chunk; at V = 160k that is ~420 rows,
# at a toy vocabulary every target position in one chunk (no recompute cost worth mentioning).
CHUNK_ELEMENTS = 2**26
HINT = "set `loss: model` in the recipe config to use the model's own loss"

class UnsupportedModelError(ValueError):
    """The chunked loss cannot reproduce this model's own loss."""

    def __init__(self, reason: str):
        super().__init__(f"chunked LM loss: {reason}; {HINT}")


@dataclass
class LossOutput:
    loss: Tensor  # [] fp32: sum of token losses / (number of target tokens or num_items_in_batch)
    loss_sum: Tensor  # [B] fp32: per-row sum of token losses (detached)
    num_tokens: Tensor  # [B] int64: per-row number of target tokens


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor | None,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
    num_items_in_batch: Tensor | int | None = None,
    fused: bool = True,
    **forward_kwargs,
) -> LossOutput:
    """Same value and gradients as ``model(input_ids, labels=labels, **forward_kwargs).loss``.

    ``model``: a transformers causal LM, optionally inside PEFT and/or DDP / DeepSpeed / compile
    wrappers (pass the object you would call). ``labels`` [B, T] are unshifted, -100 = no loss,
    as for transformers. ``forward_kwargs``: attention_mask, position_ids, inputs_embeds, ...
    ``chunk_size``: target positions per head call (None: ``CHUNK_ELEMENTS // vocabulary``).
    With ``num_items_in_batch`` the sum is divided by it (gradient accumulation), else the mean
    over target tokens is taken (NaN when there are none, like transformers). ``fused``: take a
    plain Linear head's gradients while its logits exist (`linear_ce`); False, or a PEFT-wrapped /
    ZeRO-3-partitioned head: checkpoint each chunk and recompute its logits in backward.
    """
    inner, _, head, steps = _resolve(model)
    if "logits_to_keep" in forward_kwargs or "shift_labels" in forward_kwargs:
        raise UnsupportedModelError("logits_to_keep / shift_labels are not supported")
    if _VERIFIED.get(inner) != id(head):
        _probe(model, inner, head, steps, input_ids, forward_kwargs.get("inputs_embeds"))
        _VERIFIED[inner] = id(head)
    capture = _LossHead(head, steps, labels, chunk_size, fused)
    # No cache: transformers then also derives the block-diagonal mask of packed rows from
    # position_ids (with a cache it would let documents attend to each other).
    forward_kwargs["use_cache"] = False
    forwards = {head: capture, **_tied_forwards(inner, capture)}
    out = _with_head(forwards, model, input_ids=input_ids, **forward_kwargs)
    if capture.result is None:
        raise UnsupportedModelError("the model's forward did not call its output head")
    total, row_sums, row_counts = capture.result
    # out.logits is the [B, T, 0] stand-in; adding its (empty) sum makes the loss flow back through
    # the forward's outputs, where DeepSpeed / FSDP hang their pre-backward hooks.
    logits = out["logits"] if isinstance(out, dict) else out[0]
    total = total + logits.float().sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    loss = total / (row_counts.sum() if num_items_in_batch is None else num_items_in_batch)
    return LossOutput(loss=loss, loss_sum=row_sums, num_tokens=row_counts)


@torch.no_grad()
def causal_lm_loss_sums(
    model: nn.Module, input_ids: Tensor | None, labels: Tensor, *, chunk_size: int | None = None,
    **forward_kwargs,
) -> tuple[Tensor, Tensor]:
    """Evaluation: per-row ``(sum of token losses [B] fp32, target tokens [B] int64)``; summed
    over batches and processes they give the exact held-out loss per token."""
    out = causal_lm_loss(model, input_ids, labels, chunk_size=chunk_size, **forward_kwargs)
    return out.loss_sum, out.num_tokens


LOSS_METHODS = ("chunked", "model")


def batch_loss(model: nn.Module, batch: dict, method: str = "chunked", chunk_size: int | None = None) -> Tensor:
    """The training loss of a collated ``batch`` (it holds ``labels``): `causal_lm_loss` or, with
    ``method="model"``, the model's own ``.loss`` (full logits). A model that refuses the chunked
    loss (`chunked_loss_refusal`) uses its own, with the reason logged once."""
    method = resolve_loss_method(model, method)
    if method == "model":
        return model(**batch).loss
    if method != "chunked":
        raise ValueError(f"loss must be one of {LOSS_METHODS}, got {method!r}")
    return causal_lm_loss(model, **batch, chunk_size=chunk_size).loss


@torch.no_grad()
def batch_loss_sums(model: nn.Module, batch: dict, method: str = "chunked",
                    chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Evaluation: per-row ``(sum of token losses [B] fp32, target tokens [B])`` of a batch."""
    method = resolve_loss_method(model, method)
    if method == "chunked":
        return causal_lm_loss_sums(model, **batch, chunk_size=chunk_size)
    if method != "model":
        raise ValueError(f"loss must be one of {LOSS_METHODS}, got {method!r}")
    if chunked_loss_refusal(model) is not None:
        out = model(**batch)
        sums, counts = getattr(out, "loss_sum", None), getattr(out, "num_tokens", None)
        if sums is not None and counts is not None:  # a model that computes its own loss sums
            return sums.float(), counts
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch).logits.float()  # [B, T, V]
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                             reduction="none")  # [B, T-1]
    return losses.sum(1), (targets != IGNORE_INDEX).sum(1)


# ----------------------------------------------------------------------------- model inspection

def _unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside DDP / DeepSpeedEngine (``.module``), compile, PEFT."""
    inner = model
    for _ in range(8):
        if isinstance(inner, PreTrainedModel):
            return inner
        if hasattr(type(inner), "get_base_model"):  # PeftModel
            inner = cast(Any, inner).get_base_model()
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):  # torch.compile
            inner = cast(nn.Module, inner._orig_mod)
        elif isinstance(inner.__dict__.get("_modules", {}).get("module"), nn.Module):  # DDP, DS
            inner = cast(nn.Module, inner.module)
        else:
            break
    raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model")


def _base_layer(head: nn.Module) -> nn.Module:
    """Innermost layer under PEFT wrappers (LoRA ``base_layer``, trainable tokens, modules_to_save)."""
    for _ in range(8):
        below = cast(Any, head).get_base_layer() if hasattr(head, "get_base_layer") else getattr(
            head, "original_module", None)
        if isinstance(head, nn.Linear) or not isinstance(below, nn.Module) or below is head:
            break
        head = below
    return head


def _logit_steps(inner: PreTrainedModel) -> Steps:
    """What the model's forward does to ``head(hidden)``; checked by `_probe`, so a wrong or
    missing entry leads to a refusal, never to a silently different loss."""
    text = inner.config.get_text_config()
    kind = text.model_type or inner.config.model_type
    steps: list[tuple[str, float]] = []
    if kind.startswith("cohere"):  # Cohere*: logits * self.logit_scale
        steps.append(("mul", float(getattr(inner, "logit_scale", text.logit_scale))))
    elif kind.startswith("granite") and getattr(text, "logits_scaling", None):
        steps.append(("div", float(text.logits_scaling)))  # Granite*: logits / logits_scaling
    elif kind == "hyperclovax" and getattr(text, "logits_scaling", None):
        steps.append(("mul", float(text.logits_scaling)))  # HyperCLOVAX multiplies instead
    elif kind == "falcon_h1":
        steps.append(("mul", float(text.lm_head_multiplier)))
    cap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3/4, NanoChat, ...
    if kind == "recurrent_gemma":
        cap = text.logits_soft_cap
    if cap:
        steps.append(("softcap", float(cap)))
    return tuple(steps)


def _resolve(model: nn.Module) -> tuple[PreTrainedModel, str, nn.Module, Steps]:
    """(transformers model, attribute name of its head, head module, logit transforms)."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    name = next((n for n, child in inner.named_children() if child is head), None)
    if head is None or name is None:
        raise UnsupportedModelError(f"{type(inner).__name__} has no output head to swap")
    if not isinstance(base := _base_layer(head), nn.Linear):
        raise UnsupportedModelError(f"the output head is a {type(base).__name__}, not a Linear")
    config = inner.config.get_text_config()
    for attr, term in (("output_router_logits", "a router auxiliary"), ("z_loss_coefficient", "a z-")):
        if getattr(config, attr, None):
            raise UnsupportedModelError(f"the model adds {term}loss")
    return inner, name, head, _logit_steps(inner)


# ----------------------------------------------------------------------------- computation

def _chunk_losses(head_forward, steps: Steps, hidden: Tensor, targets: Tensor) -> Tensor:
    """[n, H] hidden states, [n] targets -> [n] fp32 token losses; only here are [n, V] logits.
    ``head_forward``: the head's own ``forward`` (its submodules are called as modules, so PEFT
    layers and their ZeRO-3 hooks run; the head's own hooks fired around the stand-in)."""
    logits = transform_logits(steps, head_forward(hidden))
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _shift(labels: Tensor) -> Tensor:
    """Position t predicts labels[t + 1]; the last position predicts nothing (transformers)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # [B, T]


class _StandIn:
    """The head's ``forward`` for one call of the model (installed by `_with_head`). Not a module:
    the head itself stays in the tree and is called as usual, hooks included."""

    def __init__(self, head: nn.Module):
        self._head = head
        self._forward = head.forward  # the head's own forward, bound; never its __call__ (hooks)


class _LossHead(_StandIn):
    """Computes the loss from the hidden states it is given and returns an empty [B, T, 0] tensor
    as "logits" (so the forward's own logit transforms cost nothing)."""

    def __init__(self, head: nn.Module, steps: Steps, labels: Tensor, chunk_size: int | None, fused: bool):
        super().__init__(head)
        if chunk_size is None:
            chunk_size = CHUNK_ELEMENTS // layer_rows(head)
        self.steps, self.labels, self.chunk_size = steps, labels, max(1, int(chunk_size))
        # A plain Linear whose weight is whole here (not a ZeRO-3 partition; FSDP has unsharded it
        # by now): its gradients can be taken in the forward (linear_ce). PEFT-wrapped or sharded
        # heads go through their own forward, chunk by chunk under checkpointing.
        self.fused = fused and type(head).forward is nn.Linear.forward and not _zero3(head)
        self.result: tuple[Tensor, Tensor, Tensor] | None = None
        self.tied: TiedGrad | None = None  # set by `_tied_forwards`

    def __call__(self, hidden: Tensor) -> Tensor:  # hidden: [B, T, H]
        if self.result is not None:
            raise UnsupportedModelError("the model's forward calls its output head more than once")
        shifted = _shift(self.labels.to(hidden.device))  # [B, T]
        if hidden.shape[:-1] != shifted.shape:
            raise UnsupportedModelError(
                f"hidden states {tuple(hidden.shape)} do not match labels {tuple(shifted.shape)}")
        keep = shifted != IGNORE_INDEX  # [B, T]
        rows = keep.nonzero()[:, 0]  # [N] row of each target position
        picked, targets = hidden[keep], shifted[keep]  # [N, H], [N]
        if self.fused:
            head = cast(nn.Linear, self._head)
            total, token_losses = linear_cross_entropy(picked, head.weight, head.bias, targets, self.steps,
                                                       self.chunk_size, self.tied)
            return self._finish(total, token_losses, rows, hidden)
        # Checkpointed: backward recomputes one chunk's logits at a time instead of keeping them.
        run = partial(checkpoint, _chunk_losses, use_reentrant=False) if torch.is_grad_enabled() \
            else _chunk_losses
        size = self.chunk_size  # at least one (maybe empty) chunk: every head param gets a grad
        chunks = _same_on_all_ranks(self._head, max(-(-len(targets) // size), 1), hidden.device)
        token_losses = torch.cat([  # [N] fp32
            run(self._forward, self.steps, picked[i * size:(i + 1) * size], targets[i * size:(i + 1) * size])
            for i in range(chunks)])
        return self._finish(token_losses.sum(), token_losses, rows, hidden)

    def _finish(self, total: Tensor, token_losses: Tensor, rows: Tensor, hidden: Tensor) -> Tensor:
        """Keep (sum, per-row sums [B], per-row counts [B]); return the [B, T, 0] stand-in logits."""
        batch = hidden.shape[0]
        row_sums = torch.zeros(batch, device=total.device).index_add_(0, rows, token_losses.detach())
        self.result = (total, row_sums, torch.bincount(rows, minlength=batch))
        return total.reshape(1, 1, 1).expand(*hidden.shape[:-1], 0)  # [B, T, 0], tied to the loss


def _tied_forwards(inner: PreTrainedModel, capture: _LossHead) -> dict[nn.Module, Any]:
    """``{input embedding: its forward}`` where a fused head's weight is the embedding's: its
    backward then adds into the head's gradient instead of building a second [V, H] block at the
    step's peak (`linear_ce.TiedGrad`). Empty where that does not apply (no gradients, not fused,
    untied, an embedding with max_norm / scale_grad_by_freq or of another class)."""
    embedding = inner.get_input_embeddings()
    if not (capture.fused and torch.is_grad_enabled() and type(embedding) is nn.Embedding
            and embedding.weight is cast(nn.Linear, capture._head).weight and embedding.weight.requires_grad
            and embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse):
        return {}
    capture.tied = TiedGrad()
    return {embedding: tied_embedding(embedding, capture.tied)}


def _zero3(head: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in head.parameters())


def _same_on_all_ranks(head: nn.Module, chunks: int, device: torch.device) -> int:
    """Under ZeRO-3 the largest chunk count of all ranks (the extra chunks are empty), else ``chunks``.

    Each chunk calls the head's submodules, and under ZeRO-3 each such call may all-gather their
    parameters: ranks with different numbers of target positions would issue different numbers
    of collectives (forward and checkpointed recompute) and hang. One scalar all-reduce instead;
    every ZeRO-3 rank runs each forward anyway."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
            and _zero3(head)):
        return chunks
    count = torch.tensor([chunks], device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def _with_head(forwards: dict[nn.Module, Any], model: nn.Module, **kw):
    """Call ``model(**kw)`` with ``module.forward`` replaced by ``forwards[module]`` (the head's
    stand-in, maybe the tied embedding's forward), restored afterwards.

    The head is NOT replaced in the module tree: ZeRO-3 gathers a parameter that a module reads
    without calling the module holding it (PEFT's trainable-token deltas in an ``nn.ParameterDict``)
    only while that module is flagged "in forward", which ``DeepSpeedEngine.forward`` does for
    ``module.modules()`` of the tree as it is at call time. A stand-in module in the head's place
    hid the head's submodules from it, so the delta stayed partitioned (empty). Overriding the
    instance's ``forward`` keeps the tree, and the head's own hooks run once around the stand-in
    (its direct parameters gathered for all chunks, fetched again before the chunks' checkpointed
    recompute); PEFT submodules inside it run their hooks per chunk."""
    saved = {module: module.__dict__.get("forward", _NOTHING) for module in forwards}  # set by others
    for module, forward in forwards.items():
        module.__dict__["forward"] = forward  # not via nn.Module.__setattr__: no registration
    try:
        return model(**kw)
    finally:
        for module, forward in saved.items():
            if forward is _NOTHING:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = forward


_NOTHING = object()


class _ProbeHead(_StandIn):
    """Returns known random logits [1, T, V] so the model's own transforms and loss can be seen."""

    fake: Tensor | None = None

    def __call__(self, hidden: Tensor) -> Tensor:
        real = self._forward(hidden[..., :1, :])  # [1, 1, V] in the head's compute dtype
        gen = torch.Generator().manual_seed(0)
        # Spread of 20: a softcap of 30 (Gemma 2) or any scaling changes these values a lot. In the
        # real head's dtype: FSDP2 under bf16 casts the forward's outputs to it, a no-op for real logits.
        self.fake = (20 * torch.randn(*hidden.shape[:-1], real.shape[-1], generator=gen)).to(hidden.device, real.dtype)
        return self.fake


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def _probe(model, inner, head, steps, input_ids, inputs_embeds) -> None:
    """Once per model: run its forward on <= 8 tokens with known "logits" injected at the head and
    check that its logits and loss are ours. Catches unknown post-head transforms, extra loss
    terms, unshifted labels. All ranks call this together (same first step), as ZeRO-3 needs."""
    if input_ids is not None:
        sample, labels = {"input_ids": input_ids[:1, :8]}, input_ids[:1, :8].clone()
    else:
        sample = {"inputs_embeds": inputs_embeds[:1, :8]}
        labels = torch.zeros(sample["inputs_embeds"].shape[:2], dtype=torch.long,
                             device=inputs_embeds.device)
    labels[:, labels.shape[1] // 2] = IGNORE_INDEX
    probe, device = _ProbeHead(head), labels.device
    # fork_rng: dropout in this extra forward must not shift the training run's random stream.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                               device_type=device.type), torch.no_grad():
        out = _with_head({head: probe}, model, labels=labels, use_cache=False, **sample)
        if probe.fake is None:
            raise UnsupportedModelError("the model's forward did not call its output head")
        expected = transform_logits(steps, probe.fake)
        shifted = _shift(labels).reshape(-1)
        expected_loss = F.cross_entropy(expected.float().reshape(shifted.numel(), -1), shifted)
    logits, loss, model_name = out["logits"], out.get("loss"), type(inner).__name__
    if logits.shape != expected.shape or not torch.allclose(
            logits.float(), expected.float(), rtol=1e-5, atol=1e-5):
        seen = (f"{tuple(logits.shape)} {logits.dtype}, largest difference "
                f"{(logits.float() - expected.float()).abs().max().item():.3g}"
                if logits.shape == expected.shape else f"{tuple(logits.shape)} {logits.dtype}")
        raise UnsupportedModelError(f"{model_name}'s forward transforms the head's logits in a way "
                                    f"this loss does not reproduce (expected {steps or 'none'}: "
                                    f"{tuple(expected.shape)} {expected.dtype}; got {seen})")
    # Tight: both sides are the same fp32 ops on the same values; a router loss (coefficient 1e-3)
    # must not hide in the tolerance. A loss FSDP2 cast to bf16 is compared within its rounding.
    if loss is None or not torch.allclose(loss.float(), expected_loss, atol=1e-6,
                                          rtol=max(2e-6, torch.finfo(loss.dtype).eps)):
        raise UnsupportedModelError(f"{model_name}'s own loss is not the shifted mean cross-entropy")
