"""NaN/Inf during training: the step is skipped on the device and reported; when it persists the run
stops with a message naming the learning rates, and no non-finite PLY or checkpoint is ever written."""
import json
from pathlib import Path

import torch
from plyfile import PlyData
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from scene.gaussian_model import GaussianModel
from tests.test_train import TINY
from training.health import NonFiniteGuard
from training.trainer import Trainer


def _run(out: Path, *extra):
    return train.main(["--quiet", f"output_dir={out}", *TINY, *extra])


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _model() -> GaussianModel:
    from types import SimpleNamespace

    xyz = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    model = GaussianModel.from_points(xyz, torch.full((3, 3), 0.5), 0)
    optim = SimpleNamespace(iterations=10, percent_dense=0.01, position_lr_init=0.1, position_lr_final=0.01,
                            feature_lr=0.1, feature_lr_final=0.01, opacity_lr=0.1, scaling_lr=0.1,
                            scaling_lr_final=0.01, rotation_lr=0.1, rotation_lr_final=0.01)
    model.setup_optimizer(optim, spatial_lr_scale=1.0)
    return model


def test_guard_skips_the_optimizer_step_on_the_device_and_counts():
    model, guard = _model(), NonFiniteGuard(torch.device("cpu"))
    for t in model.params().values():
        t.grad = torch.ones_like(t)
    model.optimizer_step(guard.check(model.params()))  # finite: applied
    after_first = {k: v.detach().clone() for k, v in model.params().items()}
    moments = {k: v["exp_avg"].clone() for k, v in zip(model.params(), model.optimizer.state.values())}
    for t in model.params().values():
        t.grad = torch.ones_like(t)
    model._means.grad[1, 2] = float("nan")
    skip = guard.check(model.params())
    assert skip.item() == 1.0
    model.optimizer_step(skip)
    for name, value in model.params().items():  # parameters and Adam moments unchanged by the skipped step
        assert torch.equal(value, after_first[name]), name
    for name, state in zip(model.params(), model.optimizer.state.values()):
        assert torch.equal(state["exp_avg"], moments[name]) and state["step"].item() == 1.0
    report = guard.report()
    assert (report.skipped_total, report.skipped_new, report.worst_streak, report.streak) == (1, 1, 1, 1)
    for t in model.params().values():
        t.grad = torch.ones_like(t)
    model.optimizer_step(guard.check(model.params()))
    assert not torch.equal(model._means, after_first["xyz"])
    report = guard.report()
    assert (report.skipped_total, report.skipped_new, report.streak, report.parameters_finite) == (1, 0, 0, True)


def test_non_finite_parameters_are_flagged():
    model, guard = _model(), NonFiniteGuard(torch.device("cpu"))
    with torch.no_grad():
        model._scaling[0, 0] = float("inf")
    assert guard.check(model.params()).item() == 1.0
    assert guard.report().parameters_finite is False


def test_a_single_nan_step_is_skipped_logged_and_the_run_finishes(tmp_path, monkeypatch):
    original = Trainer.compute_gradients

    def nan_at_step_2(self, step):
        result = original(self, step)
        if step == 2:
            self.gaussians.params()["f_dc"].grad.fill_(float("nan"))
        return result

    monkeypatch.setattr(Trainer, "compute_gradients", nan_at_step_2)
    assert _run(tmp_path, "save_video=false") == 0
    run = next(tmp_path.glob("*/*"))
    log = (run / "train.log").read_text()
    assert "step 2: 1 iteration(s) since the last report had NaN/Inf gradients or Gaussians and were skipped" in log
    assert json.loads((run / "metrics.json").read_text())["skipped_steps"] == 1
    assert _scalars(run, "health/skipped_steps") == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    vertex = PlyData.read(str(run / "point_cloud.ply"))["vertex"]
    assert all(torch.isfinite(torch.as_tensor(vertex[n])).all() for n in vertex.data.dtype.names)


def test_persistent_nan_from_a_huge_learning_rate_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    code = _run(tmp_path, "OptimizationParams.iterations=40", "checkpoint_interval=1", "log_interval=5",
                "nonfinite_patience=5", "OptimizationParams.scaling_lr=1e6", "OptimizationParams.scaling_lr_final=1e6",
                "save_video=false", "save_ratio=1", "test_ratio=1")
    assert code == 1
    err = capsys.readouterr().err
    assert "training stopped at step 10: the gradients were NaN/Inf in 9 consecutive iterations (patience 5)" in err
    assert "learning rate too high" in err and "scaling 1e+06" in err and "Traceback" not in err
    run = next(tmp_path.glob("*/*"))
    assert not (run / "point_cloud.ply").exists() and not (run / "point_cloud").exists()
    checkpoint = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert checkpoint["step"] == 1  # step 1 was applied; every later step was skipped
    assert "checkpoints/last.pt holds step 1, the last good one" in err
    assert all(torch.isfinite(t).all() for t in checkpoint["gaussians"]["params"].values())
