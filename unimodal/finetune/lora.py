"""LoRA for a vocabulary-extended LM: adapters on the linear layers, and the new token rows trained.

After `add_image_tokens` the image/control rows of the input embedding (and of an untied LM head)
are freshly initialised: a LoRA run that froze them would learn nothing about images. PEFT offers
two ways to train them:

- ``trainable_tokens`` (default): PEFT's `trainable_token_indices` keeps a trainable copy of just
  the new rows. On the input embedding a tied LM head follows automatically; an untied head gets
  its own trainable rows (PEFT >= 0.17 wraps ``nn.Linear`` heads too). Adapters stay small.
- ``modules_to_save``: full trainable copies of the embedding (and untied head). Every row
  trains, old ones included; the adapter holds the whole matrices. With a tied head PEFT re-ties
  the copies (``ensure_weight_tying``).

`frozen_new_rows` checks the result, and `apply_lora` warns naming any new row left frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from ..extend import base_weight, layer_rows, unwrap_peft

logger = logging.getLogger(__name__)

NEW_ROW_MODES = ("trainable_tokens", "modules_to_save", "frozen")


@dataclass
class LoraArguments:
    """LoRA settings of a fine-tuning run (ignored unless ``use_lora``).

    Args:
        use_lora: train LoRA adapters instead of all weights.
        lora_r, lora_alpha, lora_dropout: adapter rank, scale numerator and dropout.
        lora_target_modules: module names or ``all-linear`` (every linear layer but the LM head).
        new_token_rows: how the new image/control rows train: ``trainable_tokens``,
            ``modules_to_save`` or ``frozen`` (a warning names the frozen rows).
        trainable_parts: ``"lora"``, or a unified base's own mode (`UnifiedBase.trainable_parts`,
            e.g. Chameleon's ``"image_head_rows"``); other LMs only take ``"lora"``.
    """

    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    new_token_rows: str = "trainable_tokens"
    # What trains under use_lora for a unified base (docs/bases/): its modes, e.g. Chameleon's
    # "image_head_rows" (Anole-style); "lora" (default): adapters + the rows of new_token_rows.
    trainable_parts: str = "lora"


def embedding_module_names(model: PreTrainedModel) -> tuple[str, str | None, bool]:
    """``(input embedding name, output head name or None, tied)`` as named in ``named_modules``.

    Names are leaf names (``embed_tokens``, ``wte``, ``lm_head``): PEFT matches them by suffix.
    """
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    tied = out is not None and out.weight is inp.weight
    return names[id(inp)], (names[id(out)] if out is not None else None), tied


def apply_lora(
    model: PreTrainedModel, new_token_ids: Sequence[int], args: LoraArguments
) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT LoRA model whose new token rows train as ``args.new_token_rows``.

    Under DeepSpeed ZeRO-3 call this BEFORE creating the ``Accelerator``: PEFT gathers the
    embedding rows through a CUDA broadcast once ZeRO-3 is active, which fails on CPU.
    """
    from peft import LoraConfig, get_peft_model

    if args.trainable_parts != "lora":
        raise ValueError(f"trainable_parts {args.trainable_parts!r} is a unified base's mode (docs/bases/); "
                         "this model takes trainable_parts: lora")
    if args.new_token_rows not in NEW_ROW_MODES:
        raise ValueError(f"new_token_rows must be one of {NEW_ROW_MODES}, got {args.new_token_rows!r}")
    ids = sorted(int(i) for i in new_token_ids)
    embed, head, tied = embedding_module_names(model)
    extra: dict = {}
    if args.new_token_rows == "trainable_tokens" and ids:
        rows = {embed: ids}
        if head is not None and not tied:
            rows[head] = ids
        extra["trainable_token_indices"] = rows
    elif args.new_token_rows == "modules_to_save" and ids:
        extra["modules_to_save"] = [embed] if head is None else [embed, head]
        extra["ensure_weight_tying"] = tied  # the trained copies stay tied like the originals
    target = args.lora_target_modules
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target[0] if target == ["all-linear"] else list(target),
        task_type="CAUSAL_LM",
        **extra,
    )
    peft_model = get_peft_model(model, config)
    frozen = frozen_new_rows(peft_model, ids)
    if frozen:
        listing = "; ".join(f"{name}: {_ranges(rows)}" for name, rows in frozen.items())
        logger.warning(
            "new token rows left FROZEN under LoRA (%s); the model cannot learn these tokens. "
            "Set new_token_rows to trainable_tokens or modules_to_save.", listing,
        )
    return peft_model


def frozen_new_rows(model: torch.nn.Module, new_token_ids: Sequence[int]) -> dict[str, list[int]]:
    """New token rows that no trainable parameter can change: ``{"input embedding": [...],
    "lm_head": [...]}`` (only non-empty entries). Works on plain and PEFT-wrapped models."""
    base = unwrap_peft(model)
    ids = sorted(int(i) for i in new_token_ids)
    found = {}
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    layers = [("input embedding", inp)]
    if out is not None and base_weight(out) is not base_weight(inp):  # a tied head shares the rows
        layers.append(("lm_head", out))
    for name, layer in layers:
        trainable = _trainable_rows(layer)
        frozen = [i for i in ids if i not in trainable]
        if frozen:
            found[name] = frozen
    return found


def _trainable_rows(layer: torch.nn.Module) -> set[int] | range:
    """Row ids of ``layer`` that some trainable parameter controls."""
    # PEFT's wrapper layers, recognised by their attributes (duck-typed, so Any)
    adapter: Any = getattr(layer, "token_adapter", None) or (layer if hasattr(layer, "token_indices") else None)
    if adapter is not None:  # TrainableTokensWrapper / TrainableTokensLayer
        if adapter.tied_adapter is not None:
            adapter = adapter.tied_adapter
        return {
            i for name in adapter.active_adapters
            if adapter.trainable_tokens_delta[name].requires_grad
            for i in adapter.token_indices[name]
        }
    if hasattr(layer, "modules_to_save"):  # ModulesToSaveWrapper: the active copy trains
        wrapper: Any = layer
        copies = [wrapper.modules_to_save[n] for n in wrapper.active_adapters if n in wrapper.modules_to_save]
        if any(p.requires_grad for m in copies for p in m.parameters()):
            return range(layer_rows(layer))
        return set()
    return range(layer_rows(layer)) if base_weight(layer).requires_grad else set()


def _ranges(ids: list[int]) -> str:
    """``[5, 6, 7, 9]`` -> ``"5-7, 9"`` for short warnings."""
    parts, start = [], None
    for i, cur in enumerate(ids):
        if start is None:
            start = cur
        if i + 1 == len(ids) or ids[i + 1] != cur + 1:
            parts.append(f"{start}-{cur}" if cur != start else f"{cur}")
            start = None
    return ", ".join(parts)
