"""What a Python-busy thread (Dynamo and Inductor compiling) costs each torch op of another thread.

Every torch op releases the GIL while it dispatches; CPython hands it back to a waiting thread only after
the holder has run for sys.getswitchinterval(). This measures a tiny CPU op's time beside a pure-Python
busy thread and the share of its solo speed that busy thread keeps, for several intervals
(guidance/background_compile.py picks 0.1 ms while the compilation runs):

    python bench/gil_switch.py --out bench/results/gil_switch_cpu.md
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.report import publish_table  # noqa: E402


def op_time_us(x: torch.Tensor, ops: int) -> float:
    t0 = time.perf_counter()
    for _ in range(ops):
        x.add(1.0)
    return (time.perf_counter() - t0) / ops * 1e6


class BusyThread:
    """Counts in pure Python until stopped: a stand-in for a thread that traces and lowers graphs."""

    def __init__(self):
        self.count, self._stop = 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            self.count += 1

    def __enter__(self):
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def busy_rate(seconds: float) -> float:
    """The busy thread's count per second alone."""
    with BusyThread() as busy:
        c0 = busy.count
        time.sleep(seconds)
        return (busy.count - c0) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intervals", default="5e-3,1e-3,1e-4,5e-5,2e-5", help="switch intervals (s), comma-separated")
    p.add_argument("--ops", type=int, default=3000, help="torch ops timed per interval")
    p.add_argument("--out", type=Path, help="write the table (markdown) here")
    args = p.parse_args()
    torch.set_num_threads(1)
    x = torch.ones(8)
    default = sys.getswitchinterval()
    alone_us, solo_rate = op_time_us(x, args.ops), busy_rate(0.3)
    rows = [f"| (no busy thread) | {alone_us:.1f} | - |"]
    for interval in (float(v) for v in args.intervals.split(",")):
        sys.setswitchinterval(interval)
        with BusyThread() as busy:
            c0, t0 = busy.count, time.perf_counter()
            us = op_time_us(x, args.ops)
            share = (busy.count - c0) / (time.perf_counter() - t0) / solo_rate
        rows.append(f"| {interval * 1e3:g} ms | {us:.1f} | {share:.2f} |")
    sys.setswitchinterval(default)
    table = "\n".join([
        f"# A torch op beside a Python-busy thread ({torch.__version__}, CPU, {args.ops} ops per row)", "",
        "| switch interval | us per op | busy thread's share of its solo speed |", "| --- | --- | --- |",
        *rows, "", "Command: `python bench/gil_switch.py`", ""])
    publish_table(table, args.out)


if __name__ == "__main__":
    main()
