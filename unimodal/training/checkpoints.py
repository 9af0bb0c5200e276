"""Checkpoints written atomically and checked before a resume, and the non-finite loss guard.

A checkpoint ``step-N`` is written into ``.tmp-step-N`` and renamed once complete; ``state.json``
(the step, the recipe's state, the run's config, the process count and strategy, and the size of
every file) is its last file. A relaunch therefore never resumes from a half-written folder: it
deletes the partial ones, checks the newest complete one (every file present at its saved size,
the same config, a process count it can continue with) and refuses with a message that names the
file or the setting rather than starting over in the user's output folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .resume import CheckpointError, check_resumable, world_of


class NonFiniteLossError(RuntimeError):
    """Raised when a loss is NaN/inf; the last good checkpoint is left untouched."""


class CheckpointSpaceError(UserError):
    """The disk filled while writing a checkpoint; the partial folder was removed."""


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
_PARTIAL = re.compile(r"^\.(tmp|old)-step-\d+$")  # a save in progress / a folder being replaced
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
STATE_FILE = "state.json"


def _step_of(path: Path) -> int:
    """``N`` of a ``step-N`` folder (one whose name `_STEP_DIR` matched)."""
    match = _STEP_DIR.match(path.name)
    assert match is not None
    return int(match.group(1))


def _files(folder: Path) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file below ``folder``."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` to disk, so the rename that follows never
    publishes a checkpoint whose data a crash of the machine (not just of the process) loses."""
    for path in [*sorted(folder.rglob("*")), folder]:
        _fsync(path)


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MB"


def _pause_point(name: str, step: int) -> None:
    """Test hook for the kill-during-save tests: with ``UNIMODAL_TEST_PAUSE_AT=name:step`` the
    process writes the file ``UNIMODAL_TEST_PAUSE_MARKER`` and waits there, so a test can SIGKILL
    it from outside at exactly this point of `CheckpointManager.save`. Unset, it does nothing."""
    if os.environ.get("UNIMODAL_TEST_PAUSE_AT") == f"{name}:{step}":
        Path(os.environ["UNIMODAL_TEST_PAUSE_MARKER"]).write_text(name)
        time.sleep(3600)


class CheckpointManager:
    """Numbered accelerate checkpoints under ``root`` (``step-00000100``...), written atomically.

    ``save`` and ``load`` must be called on every process (DeepSpeed writes one shard per rank).

    Args:
        root: the checkpoints folder (``output_dir/checkpoints``).
        keep_last: complete checkpoints kept; older ones are deleted only after a newer one is
            complete, so the disk must hold ``keep_last + 1`` of them during a save.
        config: the run's settings (JSON-able values); a resume with other values (except the
            ones `unimodal.training.resume.RESUMABLE_FIELDS` lists) is refused.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 2, config: dict[str, Any] | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.config = json.loads(json.dumps(config, default=str)) if config is not None else None
        self.last_save_seconds: float | None = None  # how long the last `save` took (preemption uses it)
        self.last_saved_step: int | None = None

    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=_step_of)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Temporary (half-written) folders are ignored."""
        done = [p for p in self._step_dirs() if (p / STATE_FILE).exists()]
        return done[-1] if done else None

    # ------------------------------------------------------------------------------ save
    def save(self, accelerator, step: int, state: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Save accelerate state (models, optimizers, schedulers, RNG, registered objects) + ``state``.

        ``tensors`` (e.g. an EMA copy of the weights, buffers ``state_dict`` leaves out) go to
        ``tensors.safetensors``, read back by `load_tensors`: unlike objects registered with
        ``accelerator.register_for_checkpointing`` they are never unpickled. Raises
        `CheckpointSpaceError` (on every process) when the disk is full: the partial folder is
        removed and the last complete checkpoint is left as it was.
        """
        start = time.perf_counter()
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        failure = None
        if accelerator.is_main_process:
            failure = self._attempt(lambda: self._prepare(tmp))
        self._raise_if_any(accelerator, failure, step, tmp)
        failure = self._attempt(lambda: accelerator.save_state(str(tmp)))
        self._raise_if_any(accelerator, failure, step, tmp)
        if accelerator.is_main_process:
            _pause_point("saved-state", step)
            failure = self._attempt(lambda: self._finish(accelerator, tmp, final, step, state, tensors))
        self._raise_if_any(accelerator, failure, step, tmp)
        accelerator.wait_for_everyone()
        self.last_save_seconds, self.last_saved_step = time.perf_counter() - start, step
        return final

    def _attempt(self, write) -> Exception | None:
        """Run ``write``; a full disk is returned (to be raised on every process together), any
        other error raised at once."""
        try:
            write()
        except Exception as error:
            if not self._disk_full(error):
                raise
            return error
        return None

    def _disk_full(self, error: BaseException) -> bool:
        """Whether ``error`` means the disk is full. Writers report it in their own ways: OSError
        ENOSPC / EDQUOT (Python), "os error 28" (safetensors), "file write failed" without an
        errno (torch.save), so the free space is looked at too."""
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        try:
            return shutil.disk_usage(self.root).free < 2**20
        except OSError:
            return False

    def _prepare(self, tmp: Path) -> None:
        """Make ``tmp`` empty; refuse before writing when the disk lacks room for a checkpoint
        the size of the last one."""
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        need = self._last_size()
        if need and shutil.disk_usage(self.root).free < need:
            raise OSError(errno.ENOSPC, "not enough free space for another checkpoint", str(self.root))

    def _finish(self, accelerator, tmp: Path, final: Path, step: int, state: dict[str, Any] | None,
                tensors: dict[str, torch.Tensor] | None) -> None:
        """Main process: extra tensors, then ``state.json`` (last: it marks the checkpoint
        complete), flush, rename into place, prune the oldest."""
        if tensors:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
        record = {"step": step, **(state or {}), "world": world_of(accelerator), "files": _files(tmp)}
        if self.config is not None:
            record["config"] = self.config
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
        _fsync_tree(tmp)
        _pause_point("before-rename", step)
        if final.exists():  # a relaunch re-saving a step: never leave a half-deleted step-N behind
            old = self.root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync(self.root)  # the rename itself
        _pause_point("after-rename", step)
        self._prune()

    def _raise_if_any(self, accelerator, failure: Exception | None, step: int, tmp: Path) -> None:
        """If the disk filled on any process, remove the partial folder and raise everywhere."""
        failed = float(failure is not None)
        if accelerator.num_processes > 1:
            failed = float(accelerator.reduce(torch.tensor([failed], device=accelerator.device), "sum").item())
        if not failed:
            return
        if accelerator.is_main_process:
            written = sum(_files(tmp).values()) if tmp.is_dir() else 0
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            written = 0
        accelerator.wait_for_everyone()
        latest = self.latest()
        need = self._last_size()
        needed = f"about {_mb(need)}, the size of the last one" if need else f"more than the {_mb(written)} written"
        free = _mb(shutil.disk_usage(self.root).free)
        raise CheckpointSpaceError(
            f"no space left on the disk of {self.root} writing checkpoint step-{step:08d}: it needs {needed}, "
            f"{free} are free (keep_last={self.keep_last}: room for {self.keep_last + 1} checkpoints is needed "
            f"while one is written). "
            + (f"The last good checkpoint {latest} is intact. " if latest else "No checkpoint was written yet. ")
            + "Free space or set output_dir on a larger disk, then relaunch the same command to resume.") from failure

    def _last_size(self) -> int:
        """Bytes of the newest complete checkpoint (0 if none)."""
        latest = self.latest()
        return sum(_files(latest).values()) if latest else 0

    def _prune(self) -> None:
        done = [p for p in self._step_dirs() if (p / STATE_FILE).exists()]
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------ load
    def remove_partial(self, accelerator) -> list[str]:
        """Delete what an interrupted save left (``.tmp-step-N``, ``.old-step-N``); returns their
        names. Called by `load`; every process must call it."""
        removed = []
        if accelerator.is_main_process and self.root.is_dir():
            for path in sorted(self.root.iterdir()):
                if _PARTIAL.match(path.name):
                    shutil.rmtree(path)
                    removed.append(path.name)
            if removed:
                print(f"removed the partial checkpoint(s) {removed} an interrupted save left in {self.root}",
                      flush=True)
        accelerator.wait_for_everyone()
        return removed

    def check(self, path: Path, accelerator=None) -> dict[str, Any]:
        """The state of checkpoint ``path`` after checking that every file it was saved with is
        there at its size, and (with ``accelerator``) that this run may resume from it. Raises
        `CheckpointError` naming the file or setting otherwise."""
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(
                f"{state_file} is missing, so {path} is not a complete checkpoint (a save never leaves one "
                f"like this: the folder was damaged). Delete {path} to resume from the checkpoint before it, "
                f"or choose another output_dir to start a new run")
        try:
            state = json.loads(state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{state_file} is damaged ({error}); delete {path} to resume from the "
                                  "checkpoint before it") from None
        for name, size in state.get("files", {}).items():
            file = path / name
            got = file.stat().st_size if file.is_file() else None
            if got != size:
                what = "is missing" if got is None else f"is {got} bytes but was saved with {size} (truncated?)"
                raise CheckpointError(f"checkpoint file {file} {what}. Delete {path} to resume from the "
                                      "checkpoint before it, or choose another output_dir to start a new run")
        if accelerator is not None:
            check_resumable(path, state, self.config, accelerator)
        return state

    def load(self, accelerator, path: str | os.PathLike | None = None) -> dict[str, Any] | None:
        """Restore the latest (or given) checkpoint into ``accelerator``; returns its state dict
        (None: no checkpoint, a fresh start). Partial folders are removed first; the newest
        ``step-N`` folder must be complete (`check`), never skipped silently."""
        self.remove_partial(accelerator)
        if path is None:
            found = self._step_dirs()
            if not found:
                return None
            path = found[-1]
        path = Path(path)
        state = self.check(path, accelerator)
        try:
            accelerator.load_state(str(path))
        except Exception as error:  # torch / safetensors / DeepSpeed errors rarely name the folder
            raise CheckpointError(f"checkpoint {path} could not be loaded: {type(error).__name__}: {error}. "
                                  f"Delete {path} to resume from the checkpoint before it, or choose another "
                                  "output_dir to start a new run") from error
        return state

    def load_tensors(self, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
        """The ``tensors`` saved with the latest (or given) checkpoint; empty when there are none."""
        from safetensors.torch import load_file

        path = Path(path) if path else self.latest()
        file = path / "tensors.safetensors" if path else None
        if file is None or not file.exists():
            return {}
        try:
            return load_file(file)
        except Exception as error:
            raise CheckpointError(f"checkpoint file {file} could not be read ({error}); delete {path} to "
                                  "resume from the checkpoint before it") from error
