"""bench/model_load.py's arithmetic: its stage clock and its table (timings themselves are never asserted)."""
import argparse
import time
import types

from bench.model_load import STAGES, StageClock, format_table


class Loader:
    calls = 0

    @classmethod
    def from_pretrained(cls, value):
        cls.calls += 1
        time.sleep(0.01)
        return value * 2


class Child(Loader):
    pass


def test_stage_clock_times_every_call_of_an_inherited_classmethod_and_a_function():
    clock = StageClock("cpu")
    module = types.ModuleType("loading")  # as guidance.stable_diffusion's _freeze
    module.move = lambda x: x + 1
    clock.wrap(Child, "from_pretrained", "unet")
    clock.wrap(module, "move", "to device")
    assert Child.from_pretrained(3) == 6 and Child.from_pretrained(4) == 8  # results pass through
    assert Child.calls == 2
    unet = clock.seconds["unet"]
    assert Loader.from_pretrained(1) == 2 and clock.seconds["unet"] == unet  # the parent class is left alone
    assert unet >= 0.02  # both calls added up
    assert module.move(1) == 2 and "to device" in clock.seconds
    with clock.stage("prompts"):
        time.sleep(0.01)
    assert clock.seconds["prompts"] >= 0.01


def test_table_gives_medians_their_difference_and_the_totals_spread():
    def run(total, unet):
        return {"import": 1.0, "unet": unet, "total": total, "dtype": "float32"}

    results = {"before": [run(10.0, 3.0), run(30.0, 5.0), run(12.0, 4.0)],
               "after": [run(8.0, 1.0), run(9.0, 2.0), run(7.0, 0.5)]}
    args = argparse.Namespace(argv=["--repeats", "3"], tiny=False, cold=True, repeats=3)
    table = format_table(results, "CPU", args)
    assert table.startswith("# Model load of train.py: CPU, float32")
    assert "| unet | 4.000 | 1.000 | -3.000 |" in table
    assert "| **total** | 12.000 | 8.000 | -4.000 |" in table
    assert "| import | 1.000 | 1.000 | +0.000 |" in table
    assert "before 10.00 / 30.00 s; after 7.00 / 9.00 s" in table
    assert "evicted from the page cache" in table
    rows = [line.split(" | ")[0].strip("| *") for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["import", "unet", "total"]  # stages no process measured are left out, order kept
    assert [s for s in STAGES if s in rows] == ["import", "unet"]
