"""Preemption: on SIGTERM or SIGUSR1 finish the current step, checkpoint, exit with code 75.

Clusters announce the end of a job with a signal and a grace period before SIGKILL (SLURM:
SIGTERM, or SIGUSR1 ``--signal=USR1@120`` ahead of the time limit; Kubernetes and most cloud
schedulers: SIGTERM and ``terminationGracePeriodSeconds``). `Preemption` records the signal; the
recipe asks `Preemption.should_stop` at every optimizer step (one all-reduce, so every process
stops at the same step even when only one was signalled), writes a checkpoint and raises
`Preempted`, which exits the process with `PREEMPTED_EXIT_CODE`. Relaunching the same command
resumes from that checkpoint exactly.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import torch

from ..errors import UserError

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, retry later"
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(SystemExit):
    """Raised by a recipe that stopped for a preemption signal after saving its checkpoint;
    uncaught, it exits the process with `PREEMPTED_EXIT_CODE`."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message


class Preemption:
    """Catches the preemption signals and says when to stop; see the module docstring.

    Args:
        grace_s: the seconds between the signal and the SIGKILL that follows it. A checkpoint is
            written only if the last one took less than the time left (else the run exits at
            once and the relaunch resumes from the previous checkpoint, which stays intact).
        signals: signal names to catch.
    """

    def __init__(self, grace_s: float = 30.0, signals: tuple[str, ...] = PREEMPTION_SIGNALS):
        if grace_s <= 0:
            raise UserError(f"preemption_grace_s must be > 0 seconds, got {grace_s}")
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self._received_at: float | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for name in signals:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        if self._received_at is None:
            self.signal_name, self._received_at = signal.Signals(number).name, time.monotonic()
            print(f"received {self.signal_name}: stopping after the current step to write a checkpoint "
                  f"(grace period {self.grace_s:g} s)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        """Whether this process got one of the signals."""
        return self._received_at is not None

    def time_left(self) -> float:
        """Seconds of the grace period left (infinite before any signal)."""
        if self._received_at is None:
            return float("inf")
        return self.grace_s - (time.monotonic() - self._received_at)

    def should_stop(self, accelerator) -> bool:
        """Whether any process got a signal; call it at the same step on every process."""
        stop = self.requested
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(stop)], device=accelerator.device)
            stop = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop

    def stop(self, accelerator, checkpoints, step: int, state: dict | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Preempted:
        """Write the checkpoint of ``step`` (``checkpoints.save(accelerator, step, state, tensors)``)
        unless it was just written or the last save took longer than the grace time left, end the
        trackers and return the `Preempted` to raise. Every process must call it."""
        left = self.time_left()
        if accelerator.num_processes > 1:  # the same decision everywhere: the smallest time left
            left = float(accelerator.gather(torch.tensor([min(left, 1e9)], device=accelerator.device)).min())
        took = checkpoints.last_save_seconds or 0.0
        if checkpoints.last_saved_step == step:
            where = f"checkpoint step {step} was just written"
        elif took < left:
            where = f"wrote {checkpoints.save(accelerator, step, state, tensors)}"
        else:
            where = (f"no time to write a checkpoint ({left:.0f} s left, the last took {took:.0f} s); "
                     f"the last complete one is {checkpoints.latest()}")
        message = (f"preempted ({self.signal_name or 'signal on another process'}) at step {step}: {where}. "
                   f"Exiting with code {PREEMPTED_EXIT_CODE}; relaunch the same command to resume.")
        accelerator.print(message)
        accelerator.end_training()
        self.restore()
        return Preempted(message)

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()  # also when the block raises: no handler of a finished run is left behind

    def restore(self) -> None:
        """Put back the signal handlers that were there before (`Preemption` as a context manager
        does so when its block ends)."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)  # type: ignore[arg-type]
        self._previous = {}
