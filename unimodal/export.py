"""The output of a fine-tune: ONE folder holding the LM, the processor and the image tokenizer.

```
final/
  config.json  model.safetensors  generation_config.json   the LM (merged LoRA or full weights)
  (or adapter/ + unimodal_adapter.json                      LoRA adapter + base reference)
  tokenizer.json  tokenizer_config.json  processor_config.json
  image_tokenizer/                                          VQGAN / PixelTokenizer
  README.md                                                 model card with the training config
```

A merged folder loads with ``AutoModelForCausalLM.from_pretrained`` (no unimodal code needed) and
``UnimodalProcessor.from_pretrained``. An adapter folder loads with `load_finetuned_model`:
transformers cannot attach it to the base by itself, because the base first needs the rows the
image tokens added (PEFT would index rows the base does not have). The adapter sits in a
subfolder: an ``adapter_config.json`` at the top would make ``AutoModel.from_pretrained(folder,
subfolder="image_tokenizer")`` load the adapter's base instead of the image tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from .processor import UnimodalProcessor

ADAPTER_SUBFOLDER = "adapter"

CARD_TEMPLATE = """---
library_name: transformers
base_model: {base}
tags:
- unimodal
- text-to-image
- image-to-text
---
# {name}

A unified text + image LM fine-tuned with [unimodal](https://github.com/) ({kind}).
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
images = generate_images(model, processor, ["a handwritten digit seven"])"""

ADAPTER_USAGE = """from unimodal import UnimodalProcessor
from unimodal.export import load_finetuned_model
model = load_finetuned_model("{path}")  # base + new rows + LoRA, merged
processor = UnimodalProcessor.from_pretrained("{path}")"""


def model_card(processor: UnimodalProcessor, config: dict[str, Any], *, base: str, name: str,
               adapter: bool, metrics: dict[str, float] | None = None) -> str:
    """README.md text: what the model is, how to load it, and the full training config as YAML."""
    lo, hi = processor.image_token_range
    usage = (ADAPTER_USAGE if adapter else MERGED_USAGE).format(path=name)
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
) -> Path:
    """Write the final folder (see module docstring). Call it on EVERY process, once, at the end:
    LoRA is merged into the trained model in place.

    ``config`` goes into the model card, ``base`` is the base model reference (hub name/folder),
    ``card_name`` the name the card's usage example loads (default: ``output_dir``; the Hub repo
    id when the folder is pushed).

    Under DeepSpeed ZeRO-3 or FSDP each process holds a shard: ``accelerator.get_state_dict``
    gathers the full weights (ZeRO-3 needs ``zero3_save_16bit_model: true`` in the launch config),
    and every process must take part or it hangs. The main process then loads them into
    ``rebuild()``, a fresh copy of the trained model's structure (base + new rows + LoRA), because
    the module it trained holds only its shard. Otherwise the unwrapped model is used as is.
    """
    output_dir = Path(output_dir)
    sharded = weights_sharded(accelerator)
    # Every rank: a collective when sharded (elsewhere it would only copy the weights).
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if accelerator.is_main_process:
        if sharded:
            if rebuild is None:
                raise ValueError("with sharded weights save_finetuned needs rebuild= to hold the gathered weights")
            with zero3_disabled():  # a plain copy on this process, not one more ZeRO-3 shard
                model = rebuild()
            model.load_state_dict(state_dict)
        else:
            model = accelerator.unwrap_model(model)
        is_peft = hasattr(model, "peft_config")
        adapter = is_peft and not merge_lora
        output_dir.mkdir(parents=True, exist_ok=True)
        if adapter:
            model.peft_config["default"].base_model_name_or_path = base
            model.save_pretrained(output_dir / ADAPTER_SUBFOLDER)  # adapter + the resized rows
            (output_dir / "unimodal_adapter.json").write_text(json.dumps(
                {"base_model_name_or_path": base, "vocab_size": _rows(model)}, indent=2) + "\n")
        else:
            lm = model.merge_and_unload() if is_peft else model
            lm.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        card = model_card(processor, config, base=base, name=card_name or str(output_dir), adapter=adapter,
                          metrics=metrics)
        (output_dir / "README.md").write_text(card)
    accelerator.wait_for_everyone()
    return output_dir


def weights_sharded(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (DeepSpeed ZeRO-3, FSDP): then
    only collective calls (all processes together) can run the model or read its weights."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _rows(model: torch.nn.Module) -> int:
    return int(_base(model).config.vocab_size)


@contextmanager
def zero3_disabled() -> Iterator[None]:
    """Build models as plain modules while a ZeRO-3 Accelerator exists (transformers would wrap
    them in ``zero.Init`` and PEFT would gather rows through CUDA collectives)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def load_finetuned_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, merge: bool = True):
    """Load a folder written by `save_finetuned` (merged or adapter) as a causal LM.

    For an adapter folder: the base named in ``unimodal_adapter.json``, its embeddings resized to
    the fine-tuned vocabulary, then the adapter (which carries the new rows); merged unless
    ``merge=False``.
    """
    from transformers import AutoModelForCausalLM

    meta_file = Path(path) / "unimodal_adapter.json"
    if not meta_file.exists():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from peft import PeftModel

    meta = json.loads(meta_file.read_text())
    base = AutoModelForCausalLM.from_pretrained(meta["base_model_name_or_path"], dtype=dtype)
    # Values of these rows come from the adapter; skip the costly mean initialisation.
    base.resize_token_embeddings(meta["vocab_size"], mean_resizing=False)
    model = PeftModel.from_pretrained(base, str(Path(path) / ADAPTER_SUBFOLDER))
    return model.merge_and_unload() if merge else model

