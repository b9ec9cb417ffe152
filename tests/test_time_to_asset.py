"""The start-up timeline train.py writes (metrics.json "timings") and bench/time_to_asset.py's arithmetic."""
import json
import os
import time

import pytest

import train
from bench import time_to_asset
from bench.time_to_asset import RunTimes
from utils.timeline import Timeline, process_start_time

MILESTONES = ["imports", "model_loaded", "prior_compiled", "renderer_ready", "loop_start", "first_iteration",
              "loop_end", "outputs_written"]


def test_process_start_is_before_now_and_a_milestone_is_kept_once():
    start = process_start_time()
    assert start <= time.time() and time.time() - start < 24 * 3600  # this process started today
    timeline = Timeline(origin=time.time() - 10.0)
    first = timeline.mark("a")
    assert first == pytest.approx(10.0, abs=1.0)
    time.sleep(0.01)
    assert timeline.mark("a") == first and timeline.state_dict() == {"a": first}
    assert timeline.since("a") >= 0.01


def test_train_writes_its_milestones_in_order_and_splits_the_loop(tmp_path):
    argv = ["--opt", "config/demo.yaml", "--quiet", f"output_dir={tmp_path}", "OptimizationParams.iterations=4",
            "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=300",
            "eval_resolution=32", "save_video=false", "export_mesh=false", "test_ratio=2", "save_ratio=2",
            "preview_interval=2"]
    assert train.main(argv) == 0
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    timings = json.loads((run / "metrics.json").read_text())["timings"]
    assert timings["since"] == "launch" and timings["iterations"] == 4
    assert "compiled_from_step" not in timings  # no background compilation (the default)
    values = [timings[name] for name in MILESTONES]
    assert values == sorted(values) and values[0] > 0
    # evaluations at steps 1, 2 and 4, snapshots and previews at 2 and 4, the final checkpoint: 8 pieces of work
    assert timings["in_loop_work_count"] == 8 and timings["in_loop_work_seconds"] > 0
    by_kind = timings["in_loop_work"]
    assert {k: v["count"] for k, v in by_kind.items()} == {"evaluation": 3, "snapshot": 2, "preview": 2,
                                                           "checkpoint": 1}
    assert sum(v["seconds"] for v in by_kind.values()) == pytest.approx(timings["in_loop_work_seconds"], abs=0.01)
    # the files written beside the loop: the initial evaluation's test views and those of steps 1, 2 and 4
    beside = {k: v["count"] for k, v in timings["background_writes"].items()}
    assert beside["test views"] == 4 and beside["checkpoint"] == 1 and beside["snapshot"] == 2
    loop = timings["loop_end"] - timings["first_iteration"]
    assert 0 < timings["ms_per_iteration"] * 3 / 1000 <= loop


def _times(**over) -> RunTimes:
    t = {"imports": 6.0, "model_loaded": 28.0, "prior_compiled": 128.0, "renderer_ready": 130.0, "loop_start": 130.0,
         "first_iteration": 131.0, "loop_end": 160.0, "outputs_written": 170.0, "ms_per_iteration": 100.0,
         "in_loop_work_seconds": 12.0, "in_loop_work_count": 9, "iterations": 150}
    return RunTimes("fresh", 175.0, {**t, **over})


def test_run_times_split_launch_to_first_iteration():
    r = _times()
    assert (r.imports_s, r.model_s, r.compile_ahead_s) == (6.0, 22.0, 100.0)
    assert r.first_render_s == pytest.approx(2.0) and r.first_iteration_s == pytest.approx(1.0)
    assert r.outputs_s == pytest.approx(10.0)
    # first iteration + 4999 x 0.1 s + the in-loop work + the outputs
    assert r.projected_s(5000) == pytest.approx(131.0 + 499.9 + 12.0 + 10.0)
    old = _times(prior_compiled=None)  # code that compiles in the first iteration logs no prior_compiled
    del old.timings["prior_compiled"]
    assert old.compile_ahead_s == 0.0 and old.first_render_s == pytest.approx(102.0)


def test_a_run_that_switched_to_the_compiled_programs_projects_at_their_speed():
    """compile_in_background: launch to the switch, then the remaining iterations at the compiled ms/it."""
    r = _times(compiled_iteration=140.0, compiled_from_step=50, ms_per_iteration_compiled=80.0,
               ms_per_iteration_uncompiled=150.0, ms_per_iteration=85.0)
    del r.timings["prior_compiled"]
    assert r.switched and r.loop_ms == 80.0 and r.compile_ahead_s == 0.0
    r.timings["prior_warmed_up"] = 40.0  # the uncompiled path warmed up ahead: 12 s after the model load
    assert r.compile_ahead_s == pytest.approx(12.0)
    assert r.switch_cell() == "it 50 at 140.0 s"
    assert r.projected_s(5000) == pytest.approx(140.0 + 4950 * 0.08 + 12.0 + 10.0)
    args = time_to_asset.parse_args(["--iters", "150"])
    row = [line for line in time_to_asset.format_table([r], "GPU X", args).splitlines() if line.startswith("| fresh")]
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    assert "150.0" in cells and "it 50 at 140.0 s" in cells and "**80.0**" in cells


def test_the_projection_spreads_the_previews_over_the_iterations():
    plain = _times().projected_s(5000)
    assert plain == pytest.approx(131.0 + 4999 * 0.1 + 12.0 + 10.0)
    split = {"preview": {"seconds": 1.49, "count": 1}, "evaluation": {"seconds": 10.51, "count": 8}}
    # 1.49 s of previews over 149 iterations: +10 ms for each of the 4999; the other 10.51 s stay fixed
    assert _times(in_loop_work=split).projected_s(5000) == pytest.approx(131.0 + 4999 * 0.11 + 10.51 + 10.0)


def test_table_has_one_row_per_run_with_the_bold_figures(tmp_path):
    args = time_to_asset.parse_args(["--iters", "150", "--set", "save_video=false"])
    text = time_to_asset.format_table([_times(), RunTimes("warm", 60.0, _times().timings)], "GPU X", args)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    assert rows[0][:2] == ["caches", "launch to 1st iteration"] and [r[0] for r in rows[1:]] == ["fresh", "warm"]
    assert rows[1][1] == "**131.0**" and "**100.0**" in rows[1] and "12.0 (9)" in rows[1]
    assert "194.6" in rows[1]  # (160 - 131) s over the 149 iterations after the first, in-loop work included
    assert "GPU X" in text and "save_video=false" in text and "OptimizationParams.iterations=150" in text
    assert "In-loop work" not in text  # older metrics.json files have no split
    split = {"evaluation": {"seconds": 7.5, "count": 6}, "preview": {"seconds": 4.5, "count": 3}}
    text = time_to_asset.format_table([_times(in_loop_work=split)], "GPU X", args)
    assert "In-loop work by kind (taken out of ms/it): fresh: 6 evaluation 7.5 s, 3 preview 4.5 s." in text
    assert "Written beside the loop" not in text
    beside = {"checkpoint": {"seconds": 2.25, "count": 3}}
    text = time_to_asset.format_table([_times(background_writes=beside)], "GPU X", args)
    assert "worker thread's seconds, not the loop's): fresh: 3 checkpoint 2.2 s." in text


@pytest.mark.parametrize("argv", [["--caches", "warm"], ["--caches", "portable"], ["--caches", "fresh,cold"],
                                  ["--iters", "1"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as exc:
        time_to_asset.parse_args(argv)
    assert exc.value.code == 2


def test_cache_environments_split_the_machine_from_the_home_folder(tmp_path):
    fresh = time_to_asset.cache_environment("fresh", tmp_path / "c0", tmp_path / "c0")
    portable = time_to_asset.cache_environment("portable", tmp_path / "c2", tmp_path / "c0")
    assert fresh["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c0" / "inductor")
    assert portable["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c2" / "inductor")  # a new machine
    assert portable["TRITON_CACHE_DIR"].startswith(str(tmp_path / "c2"))
    for name in ("TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME"):  # the shared home: gsplat's build, compile cache
        assert portable[name] == fresh[name] and fresh[name].startswith(str(tmp_path / "c0"))
    user = time_to_asset.cache_environment("user", tmp_path / "c3", tmp_path / "c3")
    assert user.get("TORCHINDUCTOR_CACHE_DIR") == os.environ.get("TORCHINDUCTOR_CACHE_DIR")
