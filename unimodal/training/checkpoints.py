"""Checkpoints written atomically, and the guard that stops a run on a non-finite loss."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch


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


def _step_of(path: Path) -> int:
    """``N`` of a ``step-N`` folder (one whose name `_STEP_DIR` matched)."""
    match = _STEP_DIR.match(path.name)
    assert match is not None
    return int(match.group(1))


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
        return max(done, key=_step_of, default=None)

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
            key=_step_of,
        )
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
