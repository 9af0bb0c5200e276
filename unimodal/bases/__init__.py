"""Unified bases: multimodal models that already generate images (Chameleon/Anole, Emu3, Janus),
fine-tuned in their own vocabulary, sequence format and VQ model (nothing is added to them).

Each family module (`chameleon`, `emu3`, `janus`) describes itself with a `UnifiedBase` and calls
`register_base` when imported. The modules are imported lazily, on the first `base_for` /
`registered_bases` call, and one that fails to import (a missing optional dependency, a module
not written yet) only removes its own family: a warning names it and the others still load.

`base_for` decides from a folder or Hub repo: the ``"base"`` entry of ``processor_config.json``
(written by a base's processor) first, else the ``model_type`` of ``config.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

FAMILIES = ("chameleon", "emu3", "janus")
PROCESSOR_CONFIG_NAME = "processor_config.json"  # = unimodal.processor.PROCESSOR_CONFIG_NAME


@dataclass(frozen=True)
class UnifiedBase:
    """How the recipes handle one family of unified models.

    Attributes:
        name: ``"chameleon"``, ``"emu3"`` or ``"janus"`` (the ``"base"`` of processor_config.json).
        model_types: the ``config.json`` ``model_type`` values it handles.
        load_model: ``(path, dtype=torch.float32, **from_pretrained_kwargs) -> module`` that the
            recipes train and generate with (may be a thin wrapper of the transformers model).
        load_processor: ``(path) -> UnimodalProcessor`` subclass for that folder.
        save_model: ``(module, folder)``: writes the model in its own format (its transformers
            class loads the folder).
        trainable_parts: LoRA / trainable-part mode name -> one-line description (for the docs).
        apply_lora: ``(module, LoraArguments) -> module``: the base's own LoRA wrapping, used by the
            finetune recipe instead of `unimodal.finetune.lora.apply_lora`; None: the default.
    """

    name: str
    model_types: tuple[str, ...]
    load_model: Callable[..., nn.Module]
    load_processor: Callable[[str], Any]  # a UnimodalProcessor subclass (unimodal.processor imports us)
    save_model: Callable[[nn.Module, Path], None]
    trainable_parts: Mapping[str, str] = field(default_factory=dict)
    apply_lora: Callable[[nn.Module, Any], nn.Module] | None = None


_BASES: dict[str, UnifiedBase] = {}
_LOADED = False


def register_base(base: UnifiedBase) -> None:
    """Make ``base`` known to `base_for` (family modules call this at import)."""
    _BASES[base.name] = base


def _load_all() -> None:
    """Import every family module once; a module that fails to import is skipped with a warning."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for family in FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{family}":  # the module exists but needs something missing
                logger.warning("unified base %r is unavailable: %s", family, err)
        except Exception as err:  # noqa: BLE001 — one broken family must not break the others
            logger.warning("unified base %r failed to import: %s: %s", family, type(err).__name__, err)


def registered_bases() -> dict[str, UnifiedBase]:
    """Name -> `UnifiedBase` of every family that imported."""
    _load_all()
    return dict(_BASES)


def processor_base(processor: Any) -> str | None:
    """The base name of a processor object (its ``base_name``, else the family module it comes
    from), None for a plain `UnimodalProcessor`."""
    name = getattr(processor, "base_name", None)
    if name is None:
        module = type(processor).__module__
        if module.startswith(f"{__name__}."):
            name = module[len(__name__) + 1:].split(".")[0].split("_")[0]
    return name if name in FAMILIES else None


def _read_json(path_or_repo: str | os.PathLike, name: str, **hub_kwargs) -> dict | None:
    """``name`` of a folder or Hub repo as a dict; None when it has no such file."""
    folder = Path(path_or_repo)
    if folder.is_dir():
        file = folder / name
        return json.loads(file.read_text()) if file.is_file() else None
    if folder.exists():  # a file, not a folder or repo id
        return None
    from transformers.utils import cached_file

    try:
        found = cached_file(str(path_or_repo), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    except (OSError, ValueError):  # not a repo id, or unreachable offline
        return None
    return json.loads(Path(found).read_text()) if found else None


def _model_type(config: Any) -> str | None:
    if isinstance(config, Mapping):
        return config.get("model_type")
    return getattr(config, "model_type", None)


def base_for(path_or_repo_or_config: Any, **hub_kwargs) -> UnifiedBase | None:
    """The `UnifiedBase` of a folder / Hub repo / config (a `PretrainedConfig` or dict), or None
    for anything else (a plain LM, a unimodal-extended LM).

    A folder or repo: processor_config.json's ``"base"`` first, else config.json's
    ``model_type``. A processor_config.json naming a base that is not installed raises a
    ``ValueError`` (the folder cannot be used without it).
    """
    _load_all()
    target = path_or_repo_or_config
    if target is None:
        return None
    if not isinstance(target, (str, os.PathLike)):
        model_type = _model_type(target)
        return next((b for b in _BASES.values() if model_type in b.model_types), None)
    processor_config = _read_json(target, PROCESSOR_CONFIG_NAME, **hub_kwargs)
    name = processor_config.get("base") if processor_config else None
    if name is not None:
        if name not in _BASES:
            raise ValueError(f"{target}: processor_config.json names the unified base {name!r}, which is not "
                             f"available here (available: {sorted(_BASES) or 'none'})")
        return _BASES[name]
    if processor_config is not None:  # a unimodal-extended LM
        return None
    config = _read_json(target, "config.json", **hub_kwargs)
    return base_for(config) if config is not None else None


__all__ = ["FAMILIES", "UnifiedBase", "base_for", "processor_base", "register_base", "registered_bases"]
