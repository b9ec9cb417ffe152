"""Resume: every loss continues bitwise, damaged files give messages, overrides are applied or refused
by name, metrics.json keeps every entry, a folder in use is locked, SIGTERM saves a checkpoint."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plyfile import PlyData

import train
from tests.test_train import TINY
from training.lock import LOCK_NAME
from training.stop import StopRequest
from training.trainer import Trainer
from utils.files import unique_temp_path

EXTRA = ("save_video=false", "OptimizationParams.iterations=4", "checkpoint_interval=2")


def _run(out: Path, *extra):
    return train.main(["--quiet", f"output_dir={out}", *TINY, *EXTRA, *extra])


def _resume(run: Path, *extra):
    return train.main(["--resume", str(run), "--quiet", *extra])


def _ply(path: Path) -> dict:
    v = PlyData.read(str(path))["vertex"]
    return {name: v[name].copy() for name in v.data.dtype.names}


def _crash_at(monkeypatch, step: int):
    original = Trainer.train_step

    def crash(self, s, **kwargs):
        if s == step:
            raise KeyboardInterrupt
        return original(self, s, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crash)
    return original


@pytest.mark.parametrize("loss", ["sctd", "ism", "sds", "cds", "gcs"])
def test_every_loss_resumes_bitwise(tmp_path, monkeypatch, loss):
    """Crash after the step-2 checkpoint, resume: the same Gaussians as the uninterrupted run
    (the loss's timestep generator and noise sources, GCS's fresh noise included, are restored)."""
    extra = (f"GuidanceParams.guidance_type={loss}", "GuidanceParams.fix_noise=false")
    assert _run(tmp_path / "straight", *extra) == 0
    reference = _ply(next((tmp_path / "straight").glob("*/*")) / "point_cloud.ply")
    original = _crash_at(monkeypatch, 3)
    assert _run(tmp_path / "crashed", *extra) == 130
    run = next((tmp_path / "crashed").glob("*/*"))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert _resume(run) == 0
    resumed = _ply(run / "point_cloud.ply")
    assert all((resumed[k] == reference[k]).all() for k in reference)


def test_loss_state_dict_round_trip_includes_gcs_fresh_noise():
    from utils.config import load_config

    cfg = load_config(None, [*TINY, "GuidanceParams.guidance_type=gcs"], warn_no_effect=False)
    trainer = Trainer(cfg)
    z = torch.zeros(2, 3, 8, 8)
    trainer.loss.fresh_noise(z)
    state = trainer.loss.state_dict()
    expected = trainer.loss.fresh_noise(z).clone()
    other = Trainer(cfg)
    other.loss.load_state_dict(state)
    assert torch.equal(other.loss.fresh_noise(z), expected)


def test_checkpoint_loads_with_weights_only(tmp_path):
    assert _run(tmp_path) == 0
    state = torch.load(next(tmp_path.glob("*/*")) / "checkpoints/last.pt", weights_only=True)
    parts = {"gaussians", "densification", "sampler", "loss", "rng", "global_rng", "health"}
    assert state["step"] == 4 and parts <= set(state)


@pytest.fixture
def finished_run(tmp_path) -> Path:
    assert _run(tmp_path / "out") == 0
    return next((tmp_path / "out").glob("*/*"))


def test_damaged_checkpoint_is_a_message(finished_run, caplog):
    checkpoint = finished_run / "checkpoints/last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    assert _resume(finished_run, "OptimizationParams.iterations=6") == 2
    assert f"checkpoint {checkpoint} is damaged" in caplog.text and "start a new run" in caplog.text
    assert "Traceback" not in caplog.text


def test_checkpoint_of_another_format_version_is_a_message(finished_run, caplog):
    checkpoint = finished_run / "checkpoints/last.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "version": 2}, checkpoint)  # 2: densification statistics inside the Gaussians' state
    assert _resume(finished_run, "OptimizationParams.iterations=6") == 2
    assert "has format version 2, this train.py reads version 3" in caplog.text


def test_stop_request_first_signal_asks_second_ctrl_c_aborts():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back


def test_damaged_config_is_a_message(finished_run, caplog):
    (finished_run / "config.yaml").write_text("OptimizationParams: [unclosed\n")
    assert _resume(finished_run) == 2
    assert "config.yaml is damaged or was edited into an invalid state" in caplog.text


def test_more_iterations_on_resume_extend_the_run_and_metrics(finished_run, caplog):
    before = json.loads((finished_run / "metrics.json").read_text())
    assert _resume(finished_run) == 2
    assert "already finished its 4 iterations" in caplog.text and "OptimizationParams.iterations=8" in caplog.text
    assert _resume(finished_run, "OptimizationParams.iterations=6", "log_interval=3") == 0
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["iterations"] == 6 and [s["end_step"] for s in metrics["sessions"]] == [4, 6]
    assert all(metrics[k] == before[k] for k in ("initial", "iter_1", "iter_4"))  # earlier entries kept
    assert "iter_6" in metrics and metrics["final"] == metrics["iter_6"]
    assert metrics["train_seconds"] == pytest.approx(sum(s["seconds"] for s in metrics["sessions"]))
    saved = (finished_run / "config.yaml").read_text()
    assert "iterations: 6" in saved and "log_interval: 3" in saved
    assert len((finished_run / "command.txt").read_text().splitlines()) == 2
    sessions = (finished_run / "train.log").read_text().split("INFO training.run: run folder:")[1:]
    assert len(sessions) == 2 and "6 iterations (this session from step 4)" in sessions[1]
    for session in sessions:  # no line written twice within a session
        lines = [line.split(" ", 2)[2] for line in session.splitlines()[1:]]
        assert len(lines) == len(set(lines)) and sum("finished:" in line for line in lines) == 1, lines


def test_overrides_that_change_the_trajectory_are_refused_by_name(finished_run, caplog):
    code = _resume(finished_run, "OptimizationParams.iterations=6", "GuidanceParams.guidance_scale=3", "seed=5")
    assert code == 2
    assert "seed, GuidanceParams.guidance_scale cannot change when resuming" in caplog.text
    assert "GuidanceParams.guidance_scale=7.5" in caplog.text and "seed=0" in caplog.text
    assert train.main(["--resume", str(finished_run), "--opt", "config/demo.yaml"]) == 2
    assert "--opt cannot be combined with --resume" in caplog.text


def test_a_folder_being_trained_is_refused_and_a_stale_lock_is_taken_over(finished_run, caplog, capsys):
    lock = finished_run / LOCK_NAME
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        assert _resume(finished_run, "OptimizationParams.iterations=5") == 2
        assert f"is being trained by process {sleeper.pid} on this machine" in caplog.text
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _resume(finished_run, "OptimizationParams.iterations=5") == 0  # the owner is gone: stale
    assert f"removing the stale lock {lock} left by process {sleeper.pid}" in capsys.readouterr().err
    assert not lock.exists()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    assert _run(tmp_path / "straight", "checkpoint_interval=0") == 0
    reference = _ply(next((tmp_path / "straight").glob("*/*")) / "point_cloud.ply")
    original = Trainer.train_step

    def terminated_during_3(self, step, **kwargs):
        result = original(self, step, **kwargs)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "train_step", terminated_during_3)
    assert _run(tmp_path / "stopped", "checkpoint_interval=0") == 130
    run = next((tmp_path / "stopped").glob("*/*"))
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == 3
    assert not (run / LOCK_NAME).exists()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert _resume(run) == 0
    resumed = _ply(run / "point_cloud.ply")
    assert all((resumed[k] == reference[k]).all() for k in reference)


def test_temporary_file_names_are_unique(tmp_path):
    target = tmp_path / "checkpoints" / "last.pt"
    a, b = unique_temp_path(target), unique_temp_path(target)
    assert a != b and a.parent == b.parent == target.parent and a.suffix == ".pt"
