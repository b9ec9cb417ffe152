"""CPU thread count for PyTorch that cannot collapse on a shared machine.

PyTorch starts one OpenMP thread per core. When other processes keep those cores busy, every
parallel region waits for its slowest thread, and CPU-heavy runs slow down many times over (the
CPU demo took over an hour on a loaded 2-core machine, about 2 minutes with one thread, with
identical results). The count chosen here is the number of cores this process may use (its CPU
affinity) minus the load already running on the machine, at least 1.

Order of precedence: SEGMENTDREAMER_THREADS (this program), then OMP_NUM_THREADS (OpenMP's own
setting, which PyTorch already follows: left untouched), then the automatic choice.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch

log = logging.getLogger(__name__)

ENV_OVERRIDE = "SEGMENTDREAMER_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    count: int | None  # None: leave PyTorch's setting (OMP_NUM_THREADS) alone
    reason: str


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. a container's or taskset's limit)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def machine_load() -> float:
    """1-minute load average (runnable processes); 0 where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_threads(env: Mapping[str, str], cores: int, load: float) -> ThreadChoice:
    """The thread count for `cores` usable cores under `load` (a pure function, for tests)."""
    override = env.get(ENV_OVERRIDE, "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"{ENV_OVERRIDE} must be a positive integer, got {override!r}")
        return ThreadChoice(int(override), f"{ENV_OVERRIDE}={override}")
    if env.get("OMP_NUM_THREADS", "").strip():
        return ThreadChoice(None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS'].strip()}")
    idle = math.floor(cores - load)
    count = max(1, min(cores, idle))
    return ThreadChoice(count, f"{cores} usable cores, load {load:.1f}")


def configure_threads(env: Mapping[str, str] | None = None) -> ThreadChoice:
    """Apply choose_threads to this process (torch.set_num_threads) and log the choice."""
    choice = choose_threads(os.environ if env is None else env, usable_cores(), machine_load())
    if choice.count is not None:
        torch.set_num_threads(choice.count)
    log.info("CPU threads: %d (%s)", torch.get_num_threads(), choice.reason)
    return choice
