"""Which loss a model trains with: the chunked loss (`unimodal.training.loss`) unless the model says
it cannot be exact for it (a unified base whose image logits come from another head, or a model
that computes its own exact loss), then the model's own, with the reason logged once."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

# A model (or a wrapper of one) with this attribute set to a reason string is trained with its own
# loss even when "chunked" is asked: e.g. a unified base whose image logits come from another head.
REFUSAL_ATTRIBUTE = "unimodal_chunked_loss_refusal"
# A model with ``computes_own_loss = True`` computes the exact loss in its forward (and, for the
# evaluation sums, returns ``.loss_sum [B]`` and ``.num_tokens [B]`` next to ``.loss``).
OWN_LOSS_ATTRIBUTE = "computes_own_loss"
_LOGGED_REFUSALS: set[str] = set()


def chunked_loss_refusal(model: nn.Module) -> str | None:
    """Why the chunked loss cannot be exact for ``model`` (its `REFUSAL_ATTRIBUTE`, looked up
    through DDP / DeepSpeed / compile / PEFT wrappers), or None."""
    inner: Any = model
    for _ in range(8):
        reason = inner.__dict__.get(REFUSAL_ATTRIBUTE, getattr(type(inner), REFUSAL_ATTRIBUTE, None))
        if reason:
            return str(reason)
        if getattr(type(inner), OWN_LOSS_ATTRIBUTE, False) or inner.__dict__.get(OWN_LOSS_ATTRIBUTE):
            return f"{type(inner).__name__} computes its own exact loss"
        if hasattr(type(inner), "get_base_model"):  # PeftModel
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):  # torch.compile
            inner = inner._orig_mod
        elif isinstance(inner.__dict__.get("_modules", {}).get("module"), nn.Module):  # DDP, DS
            inner = inner.module
        else:
            return None
    return None


def resolve_loss_method(model: nn.Module, method: str) -> str:
    """``method``, or ``"model"`` when ``"chunked"`` is asked of a model that refuses it (the
    reason is logged once per reason)."""
    if method != "chunked":
        return method
    reason = chunked_loss_refusal(model)
    if reason is None:
        return method
    if reason not in _LOGGED_REFUSALS:
        _LOGGED_REFUSALS.add(reason)
        logger.warning("loss: using the model's own loss instead of the chunked one: %s", reason)
    return "model"
