"""CPU thread choice: never more threads than idle usable cores, at least one; env settings win."""
import pytest
import torch

from utils.threads import ENV_OVERRIDE, choose_threads, configure_threads


@pytest.mark.parametrize("cores,load,expected", [
    (2, 0.0, 2),     # idle 2-core machine: both cores
    (2, 7.0, 1),     # 2 cores shared by 7 busy processes: one thread, never a collapse
    (2, 1.2, 1),
    (16, 3.5, 12),
    (16, 40.0, 1),
    (4, -1.0, 4),    # a bogus load never exceeds the cores
])
def test_threads_follow_idle_cores(cores, load, expected):
    choice = choose_threads({}, cores, load)
    assert choice.count == expected and f"{cores} usable cores" in choice.reason


def test_environment_settings_take_precedence():
    assert choose_threads({ENV_OVERRIDE: "3"}, 2, 9.0).count == 3
    assert choose_threads({ENV_OVERRIDE: "3", "OMP_NUM_THREADS": "1"}, 2, 0.0).count == 3
    omp = choose_threads({"OMP_NUM_THREADS": "2"}, 16, 0.0)
    assert omp.count is None and omp.reason == "OMP_NUM_THREADS=2"  # torch already follows it
    with pytest.raises(ValueError, match=f"{ENV_OVERRIDE} must be a positive integer, got '0'"):
        choose_threads({ENV_OVERRIDE: "0"}, 2, 0.0)


def test_configure_threads_sets_torch():
    before = torch.get_num_threads()
    try:
        assert configure_threads({ENV_OVERRIDE: "2"}).count == 2
        assert torch.get_num_threads() == 2
        assert configure_threads({"OMP_NUM_THREADS": "1"}).count is None
        assert torch.get_num_threads() == 2  # left alone
    finally:
        torch.set_num_threads(before)


def test_train_py_reports_a_bad_override(tmp_path, caplog, monkeypatch):
    import train

    monkeypatch.setenv(ENV_OVERRIDE, "many")
    assert train.main(["--quiet", f"output_dir={tmp_path}", "GuidanceParams.prior=analytic"]) == 2
    assert f"{ENV_OVERRIDE} must be a positive integer, got 'many'" in caplog.text
    assert not any(tmp_path.iterdir())
