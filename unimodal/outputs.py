"""The output of a fine-tune: ONE folder holding the LM, the processor and the image tokenizer.

```
final/
  config.json  model.safetensors  generation_config.json   the LM (merged LoRA or full weights)
  (or adapter/ + unimodal_adapter.json                      LoRA adapter + base reference,
   + generation_config.json)                                the fine-tuned model's generation config)
  tokenizer.json  tokenizer_config.json  processor_config.json
  image_tokenizer/                                          VQGAN / PixelTokenizer
  README.md                                                 model card with the training config
```

A merged folder loads with ``AutoModelForCausalLM.from_pretrained`` (no unimodal code needed) and
``UnimodalProcessor.from_pretrained``. An adapter folder loads with `load_model`:
transformers cannot attach it to the base by itself, because the base first needs the rows the
image tokens added (PEFT would index rows the base does not have). The adapter sits in a
subfolder: an ``adapter_config.json`` at the top would make ``AutoModel.from_pretrained(folder,
subfolder="image_tokenizer")`` load the adapter's base instead of the image tokenizer.

Every entry point (`UnimodalPipeline.from_pretrained`, the web demo, ``unimodal generate``) opens
both kinds through the one loader here: `resolve_output` finds the folder, `load_model` the LM.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import yaml

from .bases import base_for
from .extend import layer_rows, unwrap_peft
from .generation.sampling import SamplingConfig, set_sampling
from .processor import PROCESSOR_CONFIG_NAME, UnimodalProcessor
from .training.accelerator import gather_zero3_into, weights_sharded, zero3_disabled

ADAPTER_SUBFOLDER = "adapter"
ADAPTER_CONFIG_NAME = "unimodal_adapter.json"
FINAL_SUBFOLDER = "final"  # the finished model inside a run's output_dir (every recipe and the demo)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
GENERIC_PROMPT = "a photo of a cat"  # the card's example prompt when the run sampled none

CARD_TEMPLATE = """---
library_name: transformers
base_model: {base}
tags:
- unimodal
- text-to-image
- image-to-text
---
# {name}

A unified text + image LM fine-tuned with the `unimodal` Python package ({kind}).
Image tokens come from the `{image_tokenizer}` image tokenizer in `image_tokenizer/`
({grid} grid, {codebook} codes; ids {first}-{last}).

```python
{usage}
```

## Training config

```yaml
{config}
```
{metrics}"""

MERGED_USAGE = """from transformers import AutoModelForCausalLM
from unimodal import UnimodalProcessor, generate_images
model = AutoModelForCausalLM.from_pretrained("{path}")
processor = UnimodalProcessor.from_pretrained("{path}")
images = generate_images(model, processor, [{prompt}])"""

BASE_USAGE = """from transformers import {model_class}
from unimodal import UnimodalPipeline
model = {model_class}.from_pretrained("{path}")  # the model's own class (its own format)
pipe = UnimodalPipeline.from_pretrained("{path}")  # + unimodal's processor for its sequence format
images = pipe.generate_images([{prompt}])"""

ADAPTER_USAGE = """from unimodal import UnimodalProcessor
from unimodal.outputs import load_model
model = load_model("{path}")  # base + new rows + LoRA, merged
processor = UnimodalProcessor.from_pretrained("{path}")"""


def model_card(processor: UnimodalProcessor, config: dict[str, Any], *, base: str, name: str,
               adapter: bool, metrics: dict[str, float] | None = None) -> str:
    """README.md text: what the model is, how to load it, and the full training config as YAML.

    The usage example generates from the run's first ``sample_prompts`` entry (prompts the model
    was watched on during training), else from a generic prompt.
    """
    lo, hi = processor.image_token_range
    prompt = next(iter(config.get("sample_prompts") or []), GENERIC_PROMPT)
    model_class = config.get("_model_class")
    template = ADAPTER_USAGE if adapter else BASE_USAGE if model_class else MERGED_USAGE
    usage = template.format(path=name, prompt=json.dumps(prompt), model_class=model_class)
    config = {k: v for k, v in config.items() if k != "_model_class"}
    table = ""
    if metrics:
        table = "\n## Final evaluation\n\n| metric | value |\n| --- | --- |\n" + "".join(
            f"| {k} | {v:.4f} |\n" for k, v in sorted(metrics.items()))
    return CARD_TEMPLATE.format(
        base=base, name=name, kind="LoRA adapter" if adapter else "full weights",
        image_tokenizer=processor.image_tokenizer.config.model_type,
        grid="x".join(map(str, processor.grid_shape)), codebook=hi - lo, first=lo, last=hi - 1,
        usage=usage, config=yaml.safe_dump(config, sort_keys=False).strip(), metrics=table,
    )


def save_finetuned(
    accelerator,
    model: torch.nn.Module,
    processor: UnimodalProcessor,
    output_dir: str | os.PathLike,
    *,
    config: dict[str, Any],
    base: str,
    merge_lora: bool = True,
    rebuild: Callable[[], torch.nn.Module] | None = None,
    metrics: dict[str, float] | None = None,
    card_name: str | None = None,
    sampling: SamplingConfig | None = None,
) -> Path:
    """Write the final folder (see module docstring). Call it on EVERY process, once, at the end:
    LoRA is merged into the trained model in place.

    ``config`` goes into the model card, ``base`` is the base model reference (hub name/folder),
    ``card_name`` the name the card's usage example loads (default: ``output_dir``; the Hub repo
    id when the folder is pushed). ``sampling``: the text-to-image settings to save as the model's
    own (``generation_config.json``; see `unimodal.generation.model_sampling`); ``None`` keeps
    whatever the model's generation config holds.

    Under DeepSpeed ZeRO-3 or FSDP each process holds a shard, so the main process builds
    ``rebuild()``, a fresh copy of the trained model's structure (base + new rows + LoRA), and the
    full weights are gathered into it: ZeRO-3's one parameter at a time (`gather_zero3_into`),
    FSDP's with ``accelerator.get_state_dict``. Every process must take part or it hangs.
    Otherwise the unwrapped model is used as is.
    """
    from accelerate.utils import DistributedType

    output_dir = Path(output_dir)
    sharded = weights_sharded(accelerator)
    if sharded and rebuild is None:
        raise ValueError("with sharded weights save_finetuned needs rebuild= to hold the gathered weights")
    copy = None
    if sharded and accelerator.is_main_process:
        assert rebuild is not None
        with zero3_disabled():  # a plain copy on this process, not one more ZeRO-3 shard
            copy = rebuild()
    # Every rank from here: the gathers are collectives.
    if sharded and accelerator.distributed_type == DistributedType.DEEPSPEED:
        gather_zero3_into(model, copy)  # one parameter at a time
    elif sharded:  # FSDP
        state_dict = accelerator.get_state_dict(model)
        if copy is not None:
            copy.load_state_dict(state_dict)
        del state_dict
    if accelerator.is_main_process:
        if sharded:
            assert copy is not None  # built above on this process
            model = copy
        else:
            model = accelerator.unwrap_model(model)
        is_peft = hasattr(model, "peft_config")
        adapter = is_peft and not merge_lora
        unified = base_for(unwrap_peft(model).config)  # Chameleon / Emu3 / Janus: saved in its own format
        output_dir.mkdir(parents=True, exist_ok=True)
        if sampling is not None:
            set_sampling(unwrap_peft(model), sampling)
        saved = cast(Any, model)  # a PeftModel or a transformers model, duck-typed
        if adapter:
            saved.peft_config["default"].base_model_name_or_path = base
            saved.save_pretrained(output_dir / ADAPTER_SUBFOLDER)  # adapter + the resized rows
            # PEFT saves no generation config; the base's would lack the ids and settings.
            unwrap_peft(model).generation_config.save_pretrained(output_dir)
            meta = {"base_model_name_or_path": base, "vocab_size": _rows(model)}
            if unified is not None:
                meta["base"] = unified.name
            (output_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        else:
            lm = saved.merge_and_unload() if is_peft else saved
            if unified is not None:
                unified.save_model(lm, output_dir)
            else:
                lm.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        if unified is not None and not adapter:
            architectures = json.loads((output_dir / "config.json").read_text()).get("architectures") or []
            config = {**config, "_model_class": architectures[0] if architectures else "AutoModel"}
        card = model_card(processor, config, base=base, name=card_name or str(output_dir), adapter=adapter,
                          metrics=metrics)
        (output_dir / "README.md").write_text(card)
    accelerator.wait_for_everyone()
    return output_dir


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``from_pretrained``-style dtype (None / "auto" / a name) as what a base's load_model takes."""
    if dtype is None or dtype == "auto":
        return torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _rows(model: torch.nn.Module) -> int:
    """Input embedding rows (config.vocab_size is not on every config, e.g. Emu3's)."""
    return int(layer_rows(unwrap_peft(model).get_input_embeddings()))


def is_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an output folder: a processor plus a merged LM or an adapter, or the
    checkpoint folder of a unified base (Chameleon / Emu3 / Janus, even without processor_config.json:
    `load_processor` builds its processor from the model folder)."""
    path = Path(path)
    lm = (path / "config.json").is_file() or (path / ADAPTER_CONFIG_NAME).is_file()
    if lm and (path / PROCESSOR_CONFIG_NAME).is_file():
        return True
    return (path / "config.json").is_file() and _base(path) is not None


def _base(path: str | os.PathLike):
    """The `UnifiedBase` of a folder or repo, or None (a plain or extended LM)."""
    try:
        return base_for(path)
    except ValueError:  # a base named by processor_config.json that is not installed: not ours to open
        return None


def load_processor(path: str | os.PathLike, **hub_kwargs) -> UnimodalProcessor:
    """The processor of an output folder: `UnimodalProcessor.from_pretrained` (which dispatches on a
    base's processor_config.json), or a unified base's processor built from its model folder."""
    if not Path(path, PROCESSOR_CONFIG_NAME).is_file() and (unified := _base(path)) is not None:
        return unified.load_processor(str(path))
    return UnimodalProcessor.from_pretrained(path, **hub_kwargs)


def resolve_output(path: str | os.PathLike) -> str:
    """The output folder for ``path``: the folder itself, or a run folder holding it as
    ``final/``. A path that does not exist and looks like ``owner/name`` is a Hub repo id."""
    root = Path(path)
    for candidate in (root, root / FINAL_SUBFOLDER):
        if is_output(candidate):
            return str(candidate)
    if not root.exists() and _HUB_ID.match(str(path)):
        return str(path)
    what = "is not a folder" if not root.is_dir() else f"holds no {PROCESSOR_CONFIG_NAME} with an LM"
    raise FileNotFoundError(
        f"{str(path)!r} {what}: pass a folder written by `unimodal finetune` (recipes/finetune.py) or "
        f"UnimodalPipeline.save_pretrained, a run folder containing {FINAL_SUBFOLDER}/, or a Hub repo id"
    )


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32, merge: bool = True,
               **model_kwargs):
    """Load the LM of an output folder (merged or adapter; local or Hub) as a causal LM.

    For an adapter folder: the base named in ``unimodal_adapter.json``, its embeddings resized to
    the fine-tuned vocabulary, then the adapter (which carries the new rows); merged unless
    ``merge=False``. ``model_kwargs`` (e.g. ``revision``, ``token``) go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME, cached_file

    hub = {k: v for k, v in model_kwargs.items() if k in ("revision", "token")}
    meta_file = cached_file(str(path), ADAPTER_CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    if meta_file is None:
        unified = _base(path)
        if unified is not None:  # a unified base: its own class (e.g. Chameleon's unmasked one)
            return unified.load_model(str(path), dtype=_dtype(dtype), **model_kwargs)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **model_kwargs)
    from peft import PeftModel

    meta = json.loads(Path(meta_file).read_text())
    if meta.get("base"):  # a unified base: its vocabulary was not resized
        from .bases import registered_bases

        base = registered_bases()[meta["base"]].load_model(meta["base_model_name_or_path"], dtype=_dtype(dtype))
    else:
        base = AutoModelForCausalLM.from_pretrained(meta["base_model_name_or_path"], dtype=dtype)
        # Values of these rows come from the adapter; skip the costly mean initialisation.
        base.resize_token_embeddings(meta["vocab_size"], mean_resizing=False)
    adapter = Path(path) / ADAPTER_SUBFOLDER if Path(path).is_dir() else path
    kwargs: dict[str, Any] = {} if Path(path).is_dir() else {"subfolder": ADAPTER_SUBFOLDER}
    model = PeftModel.from_pretrained(base, str(adapter), **kwargs)
    if cached_file(str(path), GENERATION_CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **hub):
        # The fine-tune's ids and sampling settings, not the base's.
        unwrap_peft(model).generation_config = GenerationConfig.from_pretrained(path, **hub)
    return model.merge_and_unload() if merge else model
