"""Graceful stop on SIGTERM and Ctrl-C: finish the current iteration, save a checkpoint, exit.

A second Ctrl-C interrupts at once (KeyboardInterrupt), leaving the previous checkpoint.
Handlers are installed only in the main thread (Python's rule), and restored on exit.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """The run stopped on request after saving a checkpoint at `step`."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step, self.signal_name = step, signal_name


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
