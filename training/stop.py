"""Graceful stop on SIGTERM and Ctrl-C: finish the current iteration, save a checkpoint, exit.

A second Ctrl-C interrupts at once (KeyboardInterrupt), leaving the previous checkpoint.
Handlers are installed only in the main thread (Python's rule), and restored on exit.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """The run stopped on request after its last completed `step`; `checkpoint_step` is the step of the
    checkpoint in `run_dir` (None: none could be written, e.g. the last steps were skipped for NaN/Inf)."""

    def __init__(self, step: int, signal_name: str, run_dir: Path | None = None, checkpoint_step: int | None = None):
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step, self.signal_name = step, signal_name
        self.run_dir, self.checkpoint_step = run_dir, checkpoint_step

    def outcome(self) -> str:
        """What the stop left on disk, for the final message."""
        if self.run_dir is None:
            return "checkpoint saved"
        return on_disk_after_stop(self.run_dir, self.checkpoint_step, removed=False)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C ended a run at once (a second Ctrl-C, or one before the handlers were installed); the message
    says what is on disk. A KeyboardInterrupt, so callers that stop on Ctrl-C still do."""


def on_disk_after_stop(run_dir: Path, checkpoint_step: int | None, removed: bool) -> str:
    """What a stopped run left: its checkpoint and how to resume it, or that there is none."""
    if removed:
        return f"no step was completed and the run folder {run_dir} was removed"
    if checkpoint_step is None:
        return f"no checkpoint was written, so the run cannot be resumed ({run_dir} keeps its logs)"
    return (f"the checkpoint of step {checkpoint_step} is kept; continue with: "
            f"python train.py --resume {run_dir}")


class StopRequest:
    """Context manager; `requested` is the name of the signal received (None until then)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        log.warning("%s received: saving a checkpoint after the current iteration (Ctrl-C again to abort now)", name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
