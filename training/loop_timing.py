"""How long a session's iterations took, apart from the in-loop work (metrics.json "timings").

The loop's wall time mixes three things a user wants apart: the first iteration (compilation, CUDA-graph
capture), the other iterations (the number to compare with bench/benchmark.py), and the work done between
them on the training thread: evaluations, snapshots, checkpoints and previews (their files are written
beside the loop, utils/background_writer.py: what is left here is what the loop waited for). A run that
compiles in the background also gets the iterations before and after its switch to the compiled programs.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

from utils.timeline import Timeline

log = logging.getLogger(__name__)


class LoopTiming:
    """Milestones of the loop on `timeline` and the seconds of its in-loop work, by kind.

    synchronize: waits for the queued device work, so that a wall-clock reading covers it.
    """

    def __init__(self, timeline: Timeline, synchronize: Callable[[], None]):
        self.timeline = timeline
        self.synchronize = synchronize
        self.by_kind: dict[str, list] = {}  # kind -> [seconds, count] of this session's in-loop work
        self.work_seconds = 0.0
        self.work_count = 0
        self.work_at_first = 0.0  # in-loop work done before the first iteration of this session ended
        self.compiled_from: tuple[int, float] | None = None  # (iterations, work_seconds) at the switch

    @contextlib.contextmanager
    def work(self, kind: str) -> Iterator[None]:
        """Time in-loop work (kind: evaluation, snapshot, checkpoint, preview) apart from the iterations:
        these steps read the device anyway, so the two syncs here cost nothing."""
        self.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            seconds = time.perf_counter() - t0
            self.work_seconds += seconds
            self.work_count += 1
            totals = self.by_kind.setdefault(kind, [0.0, 0])
            totals[0] += seconds
            totals[1] += 1

    def first_iteration_done(self) -> None:
        """The session's first iteration ended (compilation and CUDA-graph capture happen in it)."""
        self.synchronize()
        self.timeline.log("first_iteration", "first iteration done")
        self.work_at_first = self.work_seconds

    def compiled_iteration_done(self, step: int, iterations: int) -> None:
        """Iteration `step` (the session's `iterations`-th) adopted the background compilation's programs."""
        self.synchronize()
        self.timeline.log("compiled_iteration", f"iteration {step} ran the compiled programs")
        self.compiled_from = (iterations, self.work_seconds)

    def timings(self, iterations: int, compiled_step: int | None, background: dict[str, list]) -> dict:
        """metrics.json "timings" after `iterations` iterations of this session: the milestones (seconds since
        the timeline's origin), ms per iteration after the first with the in-loop work taken out, that work
        in total and by kind, the seconds the background writer spent by kind (`background`: kind ->
        [seconds, count]), and around a switch (`compiled_step`) the ms per iteration before and after it."""
        events = self.timeline.state_dict()
        timings: dict = {"since": self.timeline.origin_name, **events, "iterations": iterations,
                         "in_loop_work_seconds": round(self.work_seconds, 3), "in_loop_work_count": self.work_count,
                         "in_loop_work": _by_kind(self.by_kind), "background_writes": _by_kind(background)}
        if iterations > 1 and {"first_iteration", "loop_end"} <= events.keys():
            timings["ms_per_iteration"] = ms_per_iteration(events, "first_iteration", "loop_end", 1, iterations,
                                                           self.work_at_first, self.work_seconds)
            log.info("loop: %d iterations; the first ended %.1f s after the loop started, the other %d took "
                     "%.1f ms each, plus %.1f s of in-loop work (%s)",
                     iterations, events["first_iteration"] - events.get("loop_start", 0.0), iterations - 1,
                     timings["ms_per_iteration"], self.work_seconds,
                     ", ".join(f"{v['count']} {k}: {v['seconds']:.1f} s" for k, v in timings["in_loop_work"].items())
                     or "none")
        if self.compiled_from is not None and {"first_iteration", "compiled_iteration", "loop_end"} <= events.keys():
            steps, work = self.compiled_from
            timings["compiled_from_step"] = compiled_step
            if steps > 1:  # iterations 2 .. the switch (uncompiled, compilation beside them; then the graph capture)
                timings["ms_per_iteration_uncompiled"] = ms_per_iteration(
                    events, "first_iteration", "compiled_iteration", 1, steps, self.work_at_first, work)
            if iterations > steps:
                timings["ms_per_iteration_compiled"] = ms_per_iteration(
                    events, "compiled_iteration", "loop_end", steps, iterations, work, self.work_seconds)
            log.info("compiled programs in use from iteration %s (%.1f s after launch): %s ms/iteration before, "
                     "%s after", compiled_step, events["compiled_iteration"],
                     timings.get("ms_per_iteration_uncompiled", "-"), timings.get("ms_per_iteration_compiled", "-"))
        return timings


def ms_per_iteration(events: dict, begin: str, end: str, first: int, last: int, work_begin: float,
                     work_end: float) -> float:
    """ms per iteration over iterations first+1 .. last of the session (the milestones `begin` and `end`
    were logged after iterations `first` and `last`), the in-loop work done between them taken out."""
    seconds = events[end] - events[begin] - (work_end - work_begin)
    return round(1000.0 * seconds / max(last - first, 1), 2)


def _by_kind(totals: dict[str, list]) -> dict[str, dict]:
    return {kind: {"seconds": round(seconds, 3), "count": count} for kind, (seconds, count) in sorted(totals.items())}
