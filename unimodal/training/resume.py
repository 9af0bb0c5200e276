"""Whether a run may resume from a checkpoint: the same config, and a process count it can
continue from exactly (checked before any training step; `CheckpointManager.load` calls it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError

# Settings a relaunch may change and still continue the same run: where and how often it logs,
# evaluates, samples and saves, how long it trains, and the accumulation that keeps the global
# batch when the process count changes (checked separately), and mlp_chunk_size (memory only: the
# same gradients, so checkpoints written before the setting existed resume too). Everything else
# must match.
RESUMABLE_FIELDS = frozenset({
    "output_dir", "max_steps", "num_epochs", "log_steps", "eval_steps", "save_steps", "keep_last", "report_to",
    "push_to_hub", "hub_model_id", "hub_private", "preemption_grace_s", "eval_batch_size",
    "gradient_accumulation_steps", "sample_prompts", "sample_steps", "sample_guidance_scale",
    "sample_temperature", "sample_top_k", "sample_top_p", "merge_lora", "num_workers", "num_samples_in_grid",
    "mlp_chunk_size",
})
_MISSING = "<not set>"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from (damaged, from another config or process count);
    the message names the file or setting and what to do."""


def world_of(accelerator) -> dict[str, Any]:
    """How the run is spread: ``{"num_processes": N, "strategy": "ddp" | "deepspeed-zero2" | ...}``
    ("ddp" also for one process: its checkpoint is the same whole-model state)."""
    from accelerate.utils import DistributedType

    strategy = "ddp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        strategy = f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    elif accelerator.distributed_type == DistributedType.FSDP:
        strategy = "fsdp"
    return {"num_processes": accelerator.num_processes, "strategy": strategy}


def check_resumable(path: Path, state: dict[str, Any], config: dict[str, Any] | None, accelerator) -> None:
    """Raise `CheckpointError` unless this run may continue checkpoint ``path`` (its ``state``).

    The config must match but for `RESUMABLE_FIELDS`. The process count may change only under
    DDP (whole-model checkpoints), with the same ``per_device_batch_size`` and the global batch
    kept by ``gradient_accumulation_steps``: then every optimizer step sees the same samples as
    in the run that wrote it (`continued_micro_step` continues the data order). DeepSpeed and FSDP
    checkpoints hold state partitioned per process: they resume on their own process count only.
    """
    saved_config = state.get("config")
    if config is not None and saved_config is not None:
        changed = [f"{k}: {saved_config.get(k, _MISSING)!r} -> {config.get(k, _MISSING)!r}"
                   for k in sorted(set(config) | set(saved_config))
                   if k not in RESUMABLE_FIELDS and config.get(k, _MISSING) != saved_config.get(k, _MISSING)]
        if changed:
            raise CheckpointError(
                f"checkpoint {path} was written by a run with another config ({'; '.join(changed)}). Relaunch "
                f"with the values it was written with to resume it, or choose another output_dir for a new run "
                f"(a relaunch may change only {', '.join(sorted(RESUMABLE_FIELDS))})")
    saved, now = state.get("world"), world_of(accelerator)
    if saved is None or saved == now:
        return
    old_n, new_n = saved["num_processes"], now["num_processes"]
    written = f"checkpoint {path} was written by {old_n} process(es) under {saved['strategy']}"
    if saved["strategy"] != now["strategy"] or saved["strategy"] != "ddp":
        raise CheckpointError(
            f"{written}; this launch is {new_n} process(es) under {now['strategy']}. "
            + ("DeepSpeed ZeRO and FSDP checkpoints partition the optimizer state (and ZeRO-3/FSDP the weights) "
               "by process, so they resume only on the count and launch config that wrote them: relaunch with "
               f"`accelerate launch --num_processes {old_n}` and the same launch config. To train on with another "
               "count, start a new run in another output_dir from the weights of output_dir/final or of a "
               "converted checkpoint (DeepSpeed: the zero_to_fp32.py script DeepSpeed writes next to its shards)"
               if saved["strategy"] != "ddp" else
               f"Relaunch with the launch config that wrote it ({saved['strategy']}, {old_n} process(es))"))
    old_config, new_config = saved_config or {}, config or {}
    old_a, new_a = old_config.get("gradient_accumulation_steps", 1), new_config.get("gradient_accumulation_steps", 1)
    batch = new_config.get("per_device_batch_size")
    same_batch = batch is not None and old_config.get("per_device_batch_size") == batch
    if same_batch and old_n * old_a == new_n * new_a:
        return
    fits = (old_n * old_a) % new_n == 0 and "gradient_accumulation_steps" in new_config
    raise CheckpointError(
        f"{written} with a global batch of {old_n} x {old_config.get('per_device_batch_size')} x {old_a} "
        f"(processes x per_device_batch_size x gradient_accumulation_steps); this launch has {new_n} x "
        f"{new_config.get('per_device_batch_size')} x {new_a}. To continue the same run keep "
        "per_device_batch_size and "
        + (f"set --gradient_accumulation_steps {old_n * old_a // new_n}" if fits
           else f"relaunch with {old_n} process(es)"))


def continued_micro_step(state: dict[str, Any], accelerator) -> int:
    """The saved ``micro_step`` (batches each process has read) in this launch's process count:
    the same samples have been read, now split over ``num_processes`` (see `check_resumable`)."""
    saved = state.get("world", {}).get("num_processes", accelerator.num_processes)
    return state["micro_step"] * saved // accelerator.num_processes
