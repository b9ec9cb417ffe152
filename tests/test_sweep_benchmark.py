"""bench/sweep_benchmark.py on the CPU (--tiny): the table's rows and the minutes-per-asset arithmetic."""
import pytest

from bench import sweep_benchmark
from bench.sweep_benchmark import RunTiming, minutes_per_asset


def test_minutes_per_asset_share_the_one_off_costs_in_a_sweep_only():
    # run 0 pays 60 s of compilation in its first iteration; every run spends 2 s on in-loop evaluations
    runs = [RunTiming("sweep", 0, "a", 100, wall_s=75.0, loop_s=72.0, model_load_s=20.0, ms_per_it=100.0,
                      first_iteration_s=60.1, in_loop_s=2.0),
            RunTiming("sweep", 1, "b", 100, wall_s=15.0, loop_s=12.0, model_load_s=0.0, ms_per_it=100.0,
                      first_iteration_s=0.1, in_loop_s=2.0),
            RunTiming("sweep", 2, "c", 100, wall_s=15.0, loop_s=12.0, model_load_s=0.0, ms_per_it=100.0,
                      first_iteration_s=0.1, in_loop_s=2.0)]
    single = [RunTiming("single", 0, "a", 100, wall_s=45.0, loop_s=32.0, model_load_s=20.0, ms_per_it=100.0,
                        first_iteration_s=20.1, in_loop_s=2.0, process_s=80.0)]
    assert runs[0].warmup_s == pytest.approx(60.0) and runs[1].fixed_s == pytest.approx(5.0)
    out = minutes_per_asset(runs, single, n_assets=4)
    assert out["ms_per_it"] == pytest.approx(100.0) and out["fixed_s"] == pytest.approx(5.0)
    assert out["paid_once_s"] == pytest.approx(20.0 + 60.0)
    assert out["sweep"] == pytest.approx((5.0 + 500.0 + 80.0 / 4) / 60.0)
    assert out["single_overhead_s"] == pytest.approx(80.0 - 9.9)  # the process less its 99 later iterations
    assert out["single"] == pytest.approx((70.1 + 499.9) / 60.0)


@pytest.mark.slow
def test_tiny_sweep_benchmark_prints_a_row_per_run(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert sweep_benchmark.main(["--tiny", "--prompts", "2", "--iters", "2", "--single-runs", "1",
                                 "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")]
    header, body = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]
    assert header[:3] == ["mode", "run", "prompt"] and "ms/it" in header and "model load s" in header
    assert [(r[0], r[1]) for r in body] == [("sweep", "0"), ("sweep", "1"), ("single", "0")]
    load = header.index("model load s")
    assert float(body[0][load]) > 0 and float(body[1][load]) == 0  # the sweep builds the model once
    assert float(body[2][load]) > 0 and body[2][header.index("process s")] != "-"
    text = out.read_text()
    assert "in a sweep of 200 assets" in text and "as a single run" in text


def test_previews_go_with_the_iterations_and_the_rest_of_the_in_loop_work_is_fixed():
    from bench.report import loop_split

    timings = {"iterations": 201, "ms_per_iteration": 80.0, "in_loop_work_seconds": 5.0,
               "in_loop_work": {"preview": {"seconds": 1.0, "count": 2}, "evaluation": {"seconds": 4.0, "count": 3}}}
    assert loop_split(timings) == (85.0, 4.0)  # 1 s of previews over 200 iterations: +5 ms each
    del timings["in_loop_work"]  # a metrics.json written before the split
    assert loop_split(timings) == (80.0, 5.0)
