"""The Accelerator every recipe uses, and what recipes need to know about sharded weights."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
    if distributed and on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        _fsdp_on_cpu(accelerator)
    if distributed and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{accelerator.num_processes} processes were launched but accelerate set up no process group "
            "(each would train alone). On CPU launch with `ACCELERATE_USE_CPU=true accelerate launch "
            "--multi_gpu ...` or a launch config with MULTI_CPU: `unimodal configs accelerate/ddp_cpu` prints "
            "the shipped one's path (recipes/configs/accelerate/ddp_cpu.yaml in a clone)."
        )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        if max_grad_norm is not None and plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            plugin.deepspeed_config["gradient_clipping"] = max_grad_norm
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") == "none":  # a user's file is kept as is
            _size_buckets_by_model(plugin.deepspeed_config)
    set_seed(seed)
    return accelerator


# A launch config's `deepspeed_config` section cannot set these, and DeepSpeed's defaults ignore the
# model: a 5e8-element gradient bucket (2 GB per process in fp32, filled every step: the 0.5B-shape
# ZeRO-3 run did not fit in 21 GB with it) and 5e7-element prefetches. "auto" makes accelerate's
# `prepare` size them from the model's hidden size H: reduce bucket H^2, prefetch 0.9 H^2,
# parameters under 10 H kept whole on every rank (the values of transformers' DeepSpeed examples).
MODEL_SIZED_ZERO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def _size_buckets_by_model(config: dict) -> None:
    """Set the ZeRO-2/3 bucket sizes of a launch config's DeepSpeed settings to "auto"."""
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) < 2:
        return
    for key in MODEL_SIZED_ZERO_KEYS:
        zero.setdefault(key, "auto")


def _fsdp_on_cpu(accelerator) -> None:
    """Shard for real when an FSDP launch config runs on CPU processes. accelerate 1.15 sets
    ``DistributedType.FSDP`` only for GPU-like process groups; a CPU launch is MULTI_CPU, so the
    plugin would be dropped and the run would train as plain DDP without a word. ``fully_shard``,
    accelerate's FSDP2 ``prepare``, ``save_state``/``load_state`` and ``get_state_dict`` all run on
    CPU with gloo once the state says FSDP (both shared states hold it)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def weights_sharded(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (DeepSpeed ZeRO-3, FSDP): then
    only collective calls (all processes together) can run the model or read its weights."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3



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


def gather_zero3_into(engine, target: torch.nn.Module | None) -> None:
    """Copy the weights of a ZeRO-3 ``engine`` (what ``accelerator.prepare`` returned) into
    ``target``, a plain copy of its module on the main process (``None`` on the others), one
    parameter at a time. Every process must call it: each gather is a collective.

    ``accelerator.get_state_dict`` gathers every weight into one state dict first, so the main
    process held the trained shards, the whole gathered dict and the copy it is loaded into: 2 GB
    more than its training peak at 0.5B in fp32. Here the largest extra tensor is one gathered
    parameter (the embedding)."""
    import deepspeed

    engine.empty_partition_cache()  # parameters the last forward left gathered or in flight: partitioned
    params = dict(target.named_parameters()) if target is not None else {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):  # the whole parameter on every rank, inside only
            if target is not None:
                params[name].data.copy_(param.data)
    if target is not None:  # ZeRO-3 does not partition buffers
        buffers = dict(target.named_buffers())
        for name, buffer in engine.module.named_buffers():
            buffers[name].copy_(buffer)
