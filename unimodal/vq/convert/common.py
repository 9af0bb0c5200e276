"""Shared parts of the converters: safe checkpoint loading, key renaming, building the `VQGAN`.

Every converter turns a foreign checkpoint into a `VQGANConfig` plus a state dict in unimodal's
(taming) parameter names, then `build_vqgan` loads it strictly, so a tensor the mapping misses or
leaves over is an error rather than a silently random weight.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..config import VQGANConfig
from ..model import VQGAN

StateDict = dict[str, torch.Tensor]
Rule = tuple[str, str | Callable[[re.Match], str]]  # (regex, replacement) for re.sub


@dataclass
class Conversion:
    """A converted tokenizer and what the conversion left behind.

    Attributes:
        model: the `VQGAN` in eval mode, holding the source's weights.
        notes: one line per thing a user should know: tensors dropped (discriminator, loss,
            training statistics) and behaviours that differ from the source implementation.
    """

    model: VQGAN
    notes: list[str] = field(default_factory=list)

    def save(self, out: str | os.PathLike) -> Path:
        """``save_pretrained`` the model into ``out`` (config.json + model.safetensors)."""
        self.model.save_pretrained(out)
        return Path(out)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds pickled Python objects that ``torch.load(weights_only=True)`` refuses."""


# ----------------------------------------------------------------------------- loading


def load_checkpoint(path: str | os.PathLike, weights_key: str = "state_dict") -> dict:
    """Load a ``.safetensors`` file or a torch pickle (``.ckpt``/``.pt``/``.bin``) without running code.

    Pickles are read with ``torch.load(weights_only=True)``. When that refuses the file (it stores
    objects such as ``argparse.Namespace`` or Lightning callbacks next to the tensors) this raises
    `UnsafeCheckpointError` with the one-time command that extracts the tensors under
    ``weights_key`` into a safetensors file; run it only on a file you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown objects"
        out = path.with_suffix(".safetensors")
        command = (
            f"python -c \"import torch; from safetensors.torch import save_file; "
            f"ckpt = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"save_file({{k: v.contiguous().clone() for k, v in ckpt['{weights_key}'].items()}}, '{out}')\""
        )
        raise UnsafeCheckpointError(
            f"{path} stores Python objects besides tensors ({unsafe}); loading them means unpickling, which "
            f"can run arbitrary code, so unimodal only loads checkpoints with torch.load(weights_only=True). "
            f"If you trust the file, extract its weights once into safetensors and convert that file "
            f"instead:\n\n    {command}\n"
        ) from err


def state_dict_from(checkpoint: Mapping, keys: Iterable[str], source: str) -> tuple[StateDict, str | None]:
    """The tensors of ``checkpoint``: itself when it is a flat ``{name: tensor}`` dict, else the
    first of ``keys`` present (e.g. Lightning's ``"state_dict"``). Returns ``(state_dict, key)``."""
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint), None
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key]), key
    raise ValueError(
        f"{source}: found no weights under any of {list(keys)}; top-level keys are {sorted(checkpoint)[:20]}"
    )


def hf_file_getter(src: str | os.PathLike) -> Callable[[str], Path | None]:
    """``name -> local path or None`` for files of a local folder or, failing that, a Hub repo
    (downloaded one file at a time, so only the shards that are needed come down)."""
    if Path(src).is_dir():
        root = Path(src)
        return lambda name: root / name if (root / name).is_file() else None
    if Path(src).exists():
        raise ValueError(f"{src} is a file; pass the model folder (with config.json) or a Hub repo id")

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(src))
    except HFValidationError:
        raise FileNotFoundError(f"{src}: no such folder, and not a Hub repo id ('owner/name') either") from None

    def get(name: str) -> Path | None:
        try:
            return Path(huggingface_hub.hf_hub_download(str(src), name))
        except EntryNotFoundError:
            return None

    return get


_WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "diffusion_pytorch_model.bin")


def read_hf_weights(get: Callable[[str], Path | None], select: Callable[[str], bool], source: str) -> StateDict:
    """The tensors whose names pass ``select`` from a transformers/diffusers checkpoint, reading
    only the shards (of a sharded checkpoint) that hold them."""
    for base in _WEIGHT_FILES:
        index = get(f"{base}.index.json") if base.endswith(".safetensors") else None
        if index is not None:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({shard for name, shard in weight_map.items() if select(name)})
            found = [get(shard) for shard in shards]
            files = [f for f in found if f is not None]
            if len(files) != len(found):
                raise FileNotFoundError(f"{source}: shards {shards} listed in {index.name} are missing")
        else:
            single = get(base)
            files = [single] if single is not None else []
        if not files:
            continue
        out: StateDict = {}
        for file in files:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as f:
                    out.update({name: f.get_tensor(name) for name in f.keys() if select(name)})
            else:
                out.update({k: v for k, v in torch.load(file, map_location="cpu", weights_only=True).items()
                            if select(k)})
        return out
    raise FileNotFoundError(f"{source}: no weights found (looked for {', '.join(_WEIGHT_FILES)} and their indexes)")


def transformers_vq(
    source,
    vq_class: type[PreTrainedModel],
    model_config_class: type[PretrainedConfig],
    vq_config_class: type[PretrainedConfig],
) -> tuple[PretrainedConfig, StateDict, str]:
    """``(vq config, state dict, name)`` of a transformers VQ model (Janus, Emu3).

    ``source`` is the ``vq_class`` module, a model holding one, or a folder / Hub repo whose
    ``config.json`` is the whole model's (only its ``vqmodel.*`` tensors are read, and only the
    shards holding them) or the VQ model's own.
    """
    if isinstance(source, nn.Module):
        vq = next((m for m in source.modules() if isinstance(m, vq_class)), None)
        if vq is None:
            raise TypeError(f"{type(source).__name__} holds no {vq_class.__name__}")
        return vq.config, vq.state_dict(), type(source).__name__
    get = hf_file_getter(source)
    config_file = get("config.json")
    if config_file is None:
        raise FileNotFoundError(f"{source}: no config.json; pass a transformers model folder or Hub repo")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == model_config_class.model_type:
        config = model_config_class.from_json_file(config_file).vq_config
        weights = read_hf_weights(get, lambda k: "vqmodel." in k, str(source))
        return config, {k.split("vqmodel.", 1)[1]: v for k, v in weights.items()}, str(source)
    if model_type == vq_config_class.model_type:
        weights = read_hf_weights(get, lambda k: True, str(source))
        return vq_config_class.from_json_file(config_file), weights, str(source)
    raise ValueError(
        f"{source}: model_type {model_type!r} is neither {model_config_class.model_type!r} nor "
        f"{vq_config_class.model_type!r}; check --format"
    )


# ----------------------------------------------------------------------------- renaming


def rename(state_dict: StateDict, rules: Sequence[Rule]) -> StateDict:
    """Apply every ``(regex, replacement)`` rule, in order, to every key."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def drop(state_dict: StateDict, prefixes: Mapping[str, str], notes: list[str]) -> StateDict:
    """Remove keys starting with each prefix of ``prefixes`` (prefix -> why), noting what went."""
    kept = dict(state_dict)
    for prefix, why in prefixes.items():
        gone = [k for k in kept if k.startswith(prefix)]
        for k in gone:
            del kept[k]
        if gone:
            notes.append(f"dropped {len(gone)} tensors under {prefix}* ({why})")
    return kept


def level_count(state_dict: StateDict, prefix: str) -> int:
    """Number of distinct ``i`` in keys ``prefix.{i}.…`` (e.g. resolution levels)."""
    found = {int(m[1]) for k in state_dict if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def conv_weight(linear_or_conv: torch.Tensor) -> torch.Tensor:
    """A linear projection ``[C_out, C_in]`` as the equivalent 1x1 conv weight ``[C_out, C_in, 1, 1]``."""
    return linear_or_conv[:, :, None, None] if linear_or_conv.ndim == 2 else linear_or_conv


# ----------------------------------------------------------------------------- building


def vqgan_config(*, image_size: int, ch_mult: list[int], attn_levels: Iterable[int], **arch) -> VQGANConfig:
    """A `VQGANConfig` with attention at the given levels (0 = full resolution) for ``image_size``.

    Sources place attention per level; `VQGANConfig.attn_resolutions` names the feature-map side of
    each such level at ``image_size``, so the same levels get attention whatever the size.
    """
    f = 2 ** (len(ch_mult) - 1)
    if image_size % f:
        raise ValueError(f"image_size {image_size} is not a multiple of the downsample factor {f}")
    return VQGANConfig(
        image_size=image_size, ch_mult=ch_mult, attn_resolutions=[image_size // 2**i for i in attn_levels], **arch
    )


def build_vqgan(config: VQGANConfig, state_dict: StateDict, source: str) -> VQGAN:
    """A `VQGAN` of ``config`` holding ``state_dict`` exactly (every tensor used, none missing)."""
    model = VQGAN(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what} ({len(keys)}): {keys[:4]}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
        )
        raise ValueError(
            f"{source}: the weights do not fit the architecture read from its config — {detail}. "
            f"Check that the config (e.g. --config yaml) belongs to this checkpoint and the --format is right."
        )
    model.load_state_dict(state_dict)
    return model.eval()
