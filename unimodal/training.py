"""Parts every training recipe shares: config parsing, the Accelerator, checkpoints, guards.

Recipes (``recipes/*.py``) stay linear scripts; the mechanics that must be right once live here:

- ``parse_config``: typed dataclasses from a YAML file plus ``--key value`` CLI overrides.
- ``make_accelerator``: the gloo backend on CPU (DeepSpeed otherwise silently runs as one process)
  and a seedable sampler, so a resumed run sees exactly the batches an uninterrupted one would.
- ``CheckpointManager``: accelerate state written to a temporary folder, then renamed, so a crash
  mid-save never leaves a half checkpoint that a relaunch would try to resume from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser


def parse_config(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """Parse ``--config file.yaml`` then ``--field value`` overrides into the given dataclasses.

    YAML keys must be field names of one of the dataclasses (a typo is an error, not ignored);
    command-line values win over the file. Every field needs a default.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, rest = pre.parse_known_args(args)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", type=str, default=None, help="YAML recipe config")
    if known.config:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        fields = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{known.config}: unknown keys {unknown}; valid keys: {sorted(fields)}")
        parser.set_defaults(**values)
    *outputs, extra = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if extra:
        raise ValueError(f"unrecognised arguments: {extra}")
    # The --config flag itself comes back as an extra Namespace: keep only the dataclasses.
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))


def make_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    project_dir: str | os.PathLike | None = None,
    log_with: str | list[str] | None = "tensorboard",
    seed: int = 0,
    max_grad_norm: float | None = None,
):
    """An ``Accelerator`` that behaves the same on CPU and GPU launches.

    On CPU the process group must use gloo (DeepSpeed asks for nccl and, without it, falls back to
    a single process); ``use_seedable_sampler`` makes the shuffle order a function of
    ``(seed, epoch)`` so ``skip_first_batches`` resumes mid-epoch at the exact batch.
    ``max_grad_norm`` fills DeepSpeed's ``gradient_clipping: auto`` (DeepSpeed clips inside its
    engine, where ``accelerator.clip_grad_norm_`` cannot; accelerate's own default there is 1.0).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs, set_seed

    # Only for multi-process launches: a backend in a single process makes accelerate look for a
    # process group that does not exist.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and on_cpu else []
    if distributed and on_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        # A config-file DDP launch (distributed_type MULTI_GPU + use_cpu) does not pass use_cpu on
        # to the workers, which then train as independent single processes. (Not for DeepSpeed:
        # accelerate turns DeepSpeed off in CPU mode; it runs on CPU through gloo instead.)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        project_dir=str(project_dir) if project_dir else None,
        log_with=log_with,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )
    if distributed and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{accelerator.num_processes} processes were launched but accelerate set up no process group "
            "(each would train alone). On CPU launch with `ACCELERATE_USE_CPU=true accelerate launch "
            "--multi_gpu ...` or one of recipes/configs/accelerate/*.yaml."
        )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and max_grad_norm is not None:
        if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            plugin.deepspeed_config["gradient_clipping"] = max_grad_norm
    set_seed(seed)
    return accelerator


class NonFiniteLossError(RuntimeError):
    """Raised when a loss is NaN/inf; the last good checkpoint is left untouched."""


def check_finite(loss: torch.Tensor, step: int, checkpoints: CheckpointManager | None = None) -> None:
    """Stop the run with an actionable message when ``loss`` is not finite."""
    if torch.isfinite(loss.detach()).all():
        return
    latest = checkpoints.latest() if checkpoints else None
    where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"loss is {loss.item()} at step {step}; stopping ({where}). Lower the learning rate, "
        "enable gradient clipping, or use bf16 instead of fp16."
    )


_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointManager:
    """Numbered accelerate checkpoints under ``root`` (``step-00000100``...), written atomically.

    ``save`` must be called on every process (DeepSpeed writes one shard per rank).
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Temporary (half-written) folders are ignored."""
        if not self.root.is_dir():
            return None
        done = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").exists()]
        return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)

    def save(self, accelerator, step: int, state: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Save accelerate state (models, optimizers, schedulers, RNG, registered objects) + ``state``.

        ``tensors`` (e.g. an EMA copy of the weights, buffers ``state_dict`` leaves out) go to
        ``tensors.safetensors``, read back by `load_tensors`: unlike objects registered with
        ``accelerator.register_for_checkpointing`` they are never unpickled.
        """
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
            # state.json last: its presence marks the checkpoint complete.
            (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, path: str | os.PathLike | None = None) -> dict[str, Any] | None:
        """Restore the latest (or given) checkpoint into ``accelerator``; returns its state dict."""
        path = Path(path) if path else self.latest()
        if path is None:
            return None
        accelerator.load_state(str(path))
        return json.loads((path / "state.json").read_text())

    def load_tensors(self, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
        """The ``tensors`` saved with the latest (or given) checkpoint; empty when there are none."""
        from safetensors.torch import load_file

        path = Path(path) if path else self.latest()
        file = path / "tensors.safetensors" if path else None
        return load_file(file) if file is not None and file.exists() else {}

    def _prune(self) -> None:
        done = sorted(
            (p for p in self.root.iterdir() if _STEP_DIR.match(p.name)),
            key=lambda p: int(_STEP_DIR.match(p.name).group(1)),
        )
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def infinite_batches(accelerator, dataloader, start_step: int, steps_per_epoch: int):
    """Yield ``(step, batch)`` forever from ``start_step``, resuming mid-epoch at the exact batch.

    With the seedable sampler the order of epoch ``e`` depends only on ``(seed, e)``, so skipping
    ``start_step % steps_per_epoch`` batches of epoch ``start_step // steps_per_epoch`` continues
    the data order of an uninterrupted run: no sample is seen twice or skipped.
    """
    step = start_step
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        # Collators with per-epoch randomness (unimodal.data.UnimodalCollator's condition dropout).
        if hasattr(getattr(dataloader, "collate_fn", None), "set_epoch"):
            dataloader.collate_fn.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in loader:
            yield step, batch
            step += 1
        epoch, skip = epoch + 1, 0
