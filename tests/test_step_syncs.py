"""bench/step_syncs.py: call sites named from a warning's stack; CUDA required (bench/gpu_session.sh runs it)."""
import traceback

import pytest
import torch

from bench import step_syncs

REPO = step_syncs.REPO


def _frame(path: str, line: int, name: str) -> traceback.FrameSummary:
    return traceback.FrameSummary(path, line, name)


def test_a_sync_is_named_by_the_innermost_repository_frame_and_the_innermost_frame_of_all():
    stack = [_frame(str(REPO / "bench/step_syncs.py"), 60, "main"),
             _frame(str(REPO / "training/trainer.py"), 278, "train_step"),
             _frame(str(REPO / "gaussian_renderer/gsplat_backend.py"), 120, "rasterize_gsplat"),
             _frame("/usr/lib/python3/site-packages/gsplat/rendering.py", 400, "rasterization"),
             _frame("/usr/lib/python3/warnings.py", 100, "_showwarnmsg")]
    assert step_syncs.call_site(stack, REPO) == ("gaussian_renderer/gsplat_backend.py:120 rasterize_gsplat",
                                                 "gsplat/rendering.py:400 rasterization")


def test_a_stack_without_repository_frames_says_so():
    stack = [_frame("/usr/lib/python3/site-packages/torch/_tensor.py", 10, "item")]
    assert step_syncs.call_site(stack, REPO) == ("-", "torch/_tensor.py:10 item")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs")
def test_without_cuda_the_script_stops_with_a_reason(capsys):
    with pytest.raises(SystemExit) as exc:
        step_syncs.main([])
    assert exc.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_sync_warnings_are_counted_by_site_and_other_warnings_pass_through(monkeypatch):
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def step(k):  # stands in for Trainer.train_step: two syncs here, one on odd steps, one other warning
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        if k % 2:
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)

    with pytest.warns(UserWarning, match="something else"):
        sites = step_syncs.count_syncs(step, [1, 2, 3])
    assert modes == ["warn", 0]  # debug mode on for the steps, off afterwards
    here = [key for key in sites if key[0].startswith("tests/test_step_syncs.py:")]
    assert sum(sites.values()) == 8 and sum(sites[key] for key in here) == 8
    assert sorted(sites.values()) == [2, 6]  # two lines of step(): 2 x 3 calls and 1 x 2
