"""File writes that run beside the training loop: one worker thread, in the order they were handed over.

A 5000-iteration run writes 50 TensorBoard previews, 7 sets of test views, 10 checkpoints and 2 point-cloud
snapshots from inside its loop. Done on the training thread, every one of them stops the GPU until its PNGs
are encoded or its file is written (bench/image_logging.py, bench/background_writes.py). Here the loop only
makes a host copy of what is written (uint8 images, CPU tensors; what a write needs must not change after
it is handed over) and goes on; the encoding and the disk work run on the worker.

Rules that keep train.py's promise:
- Order: writes run one at a time in submission order (test views before the metrics.json that lists them).
- Failures are not lost: the first exception of a write is raised on the submitting thread, unchanged (a
  full disk stays an OSError naming its file), at the next submit() or wait(); later writes are skipped.
- Bounded: at most `max_pending` writes wait; submit() blocks beyond that, so a slow disk slows the loop
  instead of filling the host memory with checkpoint copies.
- wait() returns when everything handed over is on disk; close() waits, then stops the worker. After
  close(), and with enabled=False, submit() writes at once on the calling thread.
- A process killed mid-write leaves the previous version of the file: every writer used here writes
  atomically (utils.files.atomic_write), so the worker is a daemon thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

_STOP = object()


class BackgroundWriter:
    """write(*args) calls run on a worker thread, one after another; seconds spent per kind are kept.

    enabled: False runs every write on the calling thread (what the loop did before; the comparison of
    bench/background_writes.py). max_pending: writes that may wait behind the running one (>= 1). An
    evaluation hands over four (test views, two TensorBoard grids, metrics.json) while a checkpoint may
    still be written; the largest, a checkpoint's copy, comes once per checkpoint_interval iterations, so
    the queue holds more than one only when the disk falls minutes behind.
    """

    def __init__(self, enabled: bool = True, max_pending: int = 16, name: str = "background-writes",
                 slow_seconds: float = 1.0):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.enabled = enabled
        self.slow_seconds = slow_seconds  # a submit that waits longer for room says so (once)
        self._said_slow = False
        self._name = name
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_kind = ""
        self._closed = False
        self._lock = threading.Lock()
        self.seconds_by_kind: dict[str, list] = {}  # kind -> [seconds, count] of the writes done

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, kind: str, write: Callable[..., object], *args) -> None:
        """Hand write(*args) over (kind names it in timings and errors: "checkpoint", "preview", ...).
        Raises the first failure of an earlier write instead of taking more work."""
        self._raise_failure()
        if not self.enabled or self._closed:
            self._run(kind, write, args)
            self._raise_failure()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        t0 = time.perf_counter()
        self._queue.put((kind, write, args))
        waited = time.perf_counter() - t0
        if waited > self.slow_seconds and not self._said_slow:
            self._said_slow = True
            log.warning("the loop waited %.1f s for room among the files written beside it (%s): the disk is "
                        "slower than the run writes; fewer previews (preview_interval) or checkpoints "
                        "(checkpoint_interval) would spare it", waited, kind)

    def wait(self) -> None:
        """Block until every write handed over has ended; raise the first failure."""
        if self._thread is not None:
            self._queue.join()
        self._raise_failure()

    def close(self) -> None:
        """wait(), then stop the worker; later submits write at once. The worker is stopped even when
        wait() raises (the failure is raised once, here)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._thread is not None:
                self._queue.put((None, _STOP, ()))
                self._thread.join()
                self._thread = None

    def _raise_failure(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, kind: str, write: Callable[..., object], args: tuple) -> None:
        with self._lock:
            failed = self._error is not None
        if failed:  # the first failure is raised; what came after it is not attempted
            log.debug("%s not written: an earlier background write failed", kind)
            return
        t0 = time.perf_counter()
        try:
            write(*args)
        except BaseException as exc:  # handed to the submitting thread as it is
            with self._lock:
                self._error = exc
        finally:
            totals = self.seconds_by_kind.setdefault(kind, [0.0, 0])
            totals[0] += time.perf_counter() - t0
            totals[1] += 1

    def _work(self) -> None:
        while True:
            kind, write, args = self._queue.get()
            try:
                if write is _STOP:
                    return
                self._run(kind, write, args)
            finally:
                self._queue.task_done()
