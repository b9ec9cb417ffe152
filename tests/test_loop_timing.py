"""training/loop_timing.py: ms per iteration with the in-loop work taken out, on a known clock."""
import pytest

import training.loop_timing as loop_timing
from training.loop_timing import LoopTiming
from utils.timeline import Timeline


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(loop_timing.time, "perf_counter", fake)
    return fake


def _timing(events: dict) -> tuple[LoopTiming, list]:
    syncs = []
    timeline = Timeline(origin=0.0)
    timeline.events.update(events)
    return LoopTiming(timeline, lambda: syncs.append(1)), syncs


def _work(timing: LoopTiming, clock: Clock, kind: str, seconds: float) -> None:
    with timing.work(kind):
        clock.now += seconds


def test_the_in_loop_work_is_taken_out_of_the_iterations(clock):
    timing, syncs = _timing({"loop_start": 5.0})
    _work(timing, clock, "evaluation", 0.5)  # the initial evaluation, before the first iteration ends
    timing.first_iteration_done()  # Timeline.mark keeps a milestone already set: set it here by hand
    timing.timeline.events["first_iteration"] = 10.0
    _work(timing, clock, "checkpoint", 1.0)
    _work(timing, clock, "preview", 0.25)
    _work(timing, clock, "preview", 0.25)
    timing.timeline.events["loop_end"] = 20.0
    t = timing.timings(11, None, {"checkpoint": [3.0, 1]})
    # (20 - 10) s over iterations 2..11, less the 1.5 s of work done after the first iteration
    assert t["ms_per_iteration"] == pytest.approx(850.0)
    assert t["in_loop_work_seconds"] == pytest.approx(2.0) and t["in_loop_work_count"] == 4
    assert t["in_loop_work"] == {"checkpoint": {"seconds": 1.0, "count": 1}, "evaluation": {"seconds": 0.5, "count": 1},
                                 "preview": {"seconds": 0.5, "count": 2}}
    assert t["background_writes"] == {"checkpoint": {"seconds": 3.0, "count": 1}}
    assert t["since"] == "launch" and t["iterations"] == 11 and "compiled_from_step" not in t
    assert len(syncs) == 2 * 4 + 1  # before and after each piece of work, and at the first iteration


def test_a_switch_to_the_compiled_programs_splits_the_loop_at_it(clock):
    timing, _ = _timing({"first_iteration": 10.0})
    timing.first_iteration_done()
    _work(timing, clock, "evaluation", 1.0)
    timing.compiled_iteration_done(step=5, iterations=5)
    timing.timeline.events["compiled_iteration"] = 14.0
    _work(timing, clock, "evaluation", 1.0)
    timing.timeline.events["loop_end"] = 20.0
    t = timing.timings(11, 5, {})
    assert t["compiled_from_step"] == 5
    assert t["ms_per_iteration_uncompiled"] == pytest.approx(750.0)  # (14 - 10 - 1) s over iterations 2..5
    assert t["ms_per_iteration_compiled"] == pytest.approx(5000.0 / 6, abs=0.01)  # (20 - 14 - 1) s over 6..11
    assert t["ms_per_iteration"] == pytest.approx(800.0)  # (20 - 10 - 2) s over 2..11


def test_one_iteration_gives_no_rate():
    timing, _ = _timing({"first_iteration": 3.0, "loop_end": 3.0})
    t = timing.timings(1, None, {})
    assert "ms_per_iteration" not in t and t["in_loop_work"] == {} and t["background_writes"] == {}
