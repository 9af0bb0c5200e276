"""The training loop's clock, data stream, learning-rate schedule and optimizer."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from ..errors import UserError


def adamw(params, lr: float, weight_decay: float = 0.0, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter allows it (floating point, on CPU or
    CUDA), else the per-parameter loop. The fused step makes no temporaries: at a 160k-row
    embedding the loop's (a sqrt and a division of each parameter) add ~2x its size to the peak,
    and on CPU the fused step is ~8x faster (0.22 vs 1.8 CPU s for 147M parameters)."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(type(p) is torch.nn.Parameter and p.is_floating_point()
                                  and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None, **kwargs)


def step_in_backward(optimizer: torch.optim.Optimizer) -> list:
    """Step each parameter as soon as backward has its whole gradient, then free that gradient
    (torchtune's ``optimizer_in_bwd``): the full set of gradients (4 bytes per fp32 parameter,
    2 GB at 0.5B) never exists at once. Returns the hook handles.

    In the hook of parameter ``p`` only ``p`` has a ``.grad``: the parameters whose gradients were
    complete earlier are stepped and freed, the others have none yet, and ``optimizer.step()``
    steps exactly the parameters that have one (AdamW keeps a step count per parameter, so the
    result equals one step over all of them). A tied matrix has one gradient-accumulation node, so
    its hook runs once, after both uses. The caller's ``optimizer.step()`` after backward then has
    nothing left to do. Only exact without gradient clipping or accumulation and on one process
    (see `check_step_in_backward`)."""
    def step(param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None

    return [p.register_post_accumulate_grad_hook(step)
            for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def check_step_in_backward(num_processes: int, distributed_type: str, max_grad_norm: float,
                           gradient_accumulation_steps: int) -> None:
    """Refuse `step_in_backward` where it would change the update, saying what to set instead."""
    if max_grad_norm > 0:
        raise UserError(f"optimizer_in_backward steps each parameter before the global gradient norm is "
                        f"known, so it cannot clip: set max_grad_norm: 0 (it is {max_grad_norm})")
    if gradient_accumulation_steps > 1:
        raise UserError("optimizer_in_backward steps in every backward, so it cannot accumulate "
                        f"{gradient_accumulation_steps} micro-batches: set gradient_accumulation_steps: 1 "
                        "(or optimizer_in_backward: false)")
    if num_processes > 1 or distributed_type != "NO":  # accelerate's DistributedType is a str enum
        raise UserError(f"optimizer_in_backward runs on one process only (this launch: {num_processes} "
                        f"processes, {str(distributed_type).split('.')[-1]}: DDP, FSDP and DeepSpeed reduce "
                        "or shard gradients after its hooks would have stepped); "
                        "launch one process, or use ZeRO-2/3 to shard the gradients instead")


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


class Throughput:
    """Trained (non-pad) tokens per second of the training loop.

    Counts the time from the end of one micro-step to the end of the next (data loading
    included), except across evaluation, sampling and checkpoints: call `skip` after those. The
    first micro-step of a launch is not counted (lazy initialisation, allocator warm-up). Besides
    wall-clock ``seconds`` it keeps this process's CPU time (``cpu_seconds``): on a machine shared
    with other jobs that is the steadier measure.
    """

    def __init__(self):
        self.tokens = self.positions = 0  # summed over processes
        self.seconds = self.cpu_seconds = 0.0
        self._last: tuple[float, float] | None = None  # (wall, cpu) at the last tick
        self._window = [0, 0.0]  # tokens, seconds since the last `window_rate`

    def skip(self) -> None:
        """Restart the clock: the time since the last tick is not training time."""
        self._last = (time.perf_counter(), time.process_time())

    def tick(self, tokens: int, positions: int) -> None:
        """One micro-step done: ``tokens`` non-pad tokens out of ``positions`` (batch x length)."""
        now = (time.perf_counter(), time.process_time())
        if self._last is not None:
            self.seconds += now[0] - self._last[0]
            self.cpu_seconds += now[1] - self._last[1]
            self.tokens += tokens
            self.positions += positions
            self._window[0] += tokens
            self._window[1] += now[0] - self._last[0]
        self._last = now

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.positions if self.positions else 0.0

    def window_rate(self) -> float:
        """Tokens/s since the previous call (for the progress bar and logs)."""
        tokens, seconds = self._window
        self._window = [0, 0.0]
        return tokens / seconds if seconds else 0.0

    def save(self, path: str | os.PathLike, **extra) -> None:
        """Write ``train_stats.json``: tokens, seconds, tokens/s, padding share (+ ``extra``)."""
        stats = {"tokens": self.tokens, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                 "tokens_per_s": self.tokens_per_s, "padding_fraction": self.padding_fraction, **extra}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(stats, indent=2) + "\n")
