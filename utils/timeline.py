"""When a run's start-up milestones happened: seconds since the process was launched.

A user waiting for the first iteration wants to know where the time went ("first iteration 41.2 s after
launch"): the imports, the model load, the renderer's first call (gsplat compiles its CUDA code there on
a fresh machine), compilation and CUDA-graph capture in the first iteration. `Timeline` logs each
milestone once and keeps them for metrics.json (bench/time_to_asset.py reads them there). This module
imports nothing heavy: train.py imports it first, before torch.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

_IMPORTED_AT = time.time()  # fallback launch time: when train.py imported this module (before torch)


def process_start_time() -> float:
    """The epoch time at which this process started (Linux: /proc, 10 ms ticks); else this module's import."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: starttime, after "pid (comm)"
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        started = boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT
    # btime is whole seconds: never place the launch after the import this process has demonstrably done
    return min(started, _IMPORTED_AT)


class Timeline:
    """Milestones of one run in seconds since `origin` (the process launch by default)."""

    def __init__(self, origin: float | None = None, origin_name: str = "launch"):
        self.origin = process_start_time() if origin is None else origin
        self.origin_name = origin_name
        self.events: dict[str, float] = {}  # milestone -> seconds since origin

    def mark(self, name: str) -> float:
        """Record `name` now (the first time only); returns its seconds since the origin."""
        if name not in self.events:
            self.events[name] = round(time.time() - self.origin, 3)
        return self.events[name]

    def since(self, name: str) -> float:
        """Seconds from milestone `name` to now."""
        return time.time() - self.origin - self.events[name]

    def log(self, name: str, what: str) -> float:
        """Mark `name` and log 'what X s after launch'."""
        at = self.mark(name)
        log.info("%s %.1f s after %s", what, at, self.origin_name)
        return at

    def state_dict(self) -> dict[str, float]:
        return dict(self.events)
