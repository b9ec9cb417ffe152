"""Compilation in a background thread (issue 20): the first iterations run uncompiled, the compiled programs
take over at an iteration boundary, and the run's numbers do not depend on when that happens.

CPU checks (the Stable Diffusion prior compiles only on CUDA; tests/test_fast_path.py checks its background
path on a GPU): the hand-over object itself; a whole train.py run on the analytic prior whose denoiser is
compiled by Dynamo in a background thread, switching mid-run, gives the same asset bit for bit as a run
compiled before its first step; the training step draws nothing from torch's global generators, which
Dynamo rewinds while it traces in another thread.
"""
import json
import logging
import sys
import threading
from pathlib import Path

import pytest
import torch
from plyfile import PlyData
from torch._dynamo.utils import counters

import train
import training.trainer
from guidance.background_compile import BackgroundCompile
from guidance.stable_diffusion import StableDiffusionPrior
from tests.prior_doubles import BackgroundCompilingPrior
from tests.test_train import TINY
from training.trainer import Trainer, apply_pipeline_options
from utils.config import load_config


def test_poll_is_true_once_after_the_warm_up_and_never_while_it_runs():
    release = threading.Event()
    done = []
    job = BackgroundCompile(lambda: (release.wait(10), done.append(1)), "a test program")
    assert not job.poll()  # not started
    job.start()
    assert job.running and not job.poll()
    release.set()
    job.join()
    assert done == [1] and job.poll()
    assert not job.poll()  # adopted once only
    assert job.seconds is not None and job.seconds >= 0
    with pytest.raises(RuntimeError, match="already started"):
        job.start()


def test_the_gil_switch_interval_is_short_while_compiling_and_restored_after():
    """Each torch op of the training thread waits up to one switch interval for the GIL while the
    compilation thread runs Python; the default 5 ms made the uncompiled loop 8x slower on an H100."""
    default = sys.getswitchinterval()
    release, seen = threading.Event(), []
    job = BackgroundCompile(lambda: (seen.append(sys.getswitchinterval()), release.wait(10)), "a test program")
    job.start()
    assert sys.getswitchinterval() == pytest.approx(min(1e-4, default))
    release.set()
    job.join()
    assert seen == [pytest.approx(min(1e-4, default))]
    assert sys.getswitchinterval() == default  # restored by the thread itself, polled or not


def test_a_failed_warm_up_still_restores_the_switch_interval():
    default = sys.getswitchinterval()
    job = BackgroundCompile(lambda: 1 / 0, "a test program")
    job.start()
    job.join()
    assert sys.getswitchinterval() == default


def test_a_failed_warm_up_is_reported_once_and_never_adopted(caplog):
    def fail():
        raise RuntimeError("no triton here")

    job = BackgroundCompile(fail, "a test program")
    job.start()
    with caplog.at_level(logging.WARNING, logger="guidance.background_compile"):
        job.join()
        assert not job.poll()
        assert not job.poll()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no triton here" in warnings[0] and "uncompiled" in warnings[0]


def test_dynamo_compiles_in_a_background_thread_to_the_same_numbers():
    torch._dynamo.reset()
    counters.clear()
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))

    def f(x):
        return torch.tanh(x @ weight).sum(dim=1)

    compiled = torch.compile(f, backend="eager")
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    job = BackgroundCompile(lambda: compiled(x), "f")
    job.start()
    job.join()
    assert job.poll() and counters["stats"]["unique_graphs"] == 1  # traced there, once
    assert torch.equal(compiled(x), f(x))
    assert counters["stats"]["unique_graphs"] == 1  # this thread reuses it


def _run(tmp_path: Path, name: str, monkeypatch, *extra) -> tuple[dict, dict, BackgroundCompilingPrior]:
    made = []

    def build(cfg, device):
        prior = BackgroundCompilingPrior.from_config(cfg.guidance, device, backend=cfg.pipeline.renderer)
        prior.hold = 30  # denoiser calls before the background compilation starts: mid-run
        made.append(prior)
        return prior

    monkeypatch.setattr(training.trainer, "build_prior", build)
    out = tmp_path / name
    assert train.main(["--quiet", f"output_dir={out}", *TINY, "OptimizationParams.iterations=16",
                       "checkpoint_interval=0", "save_video=false", "export_mesh=false", *extra]) == 0
    run = next(out.glob("*/*"))
    v = PlyData.read(str(run / "point_cloud.ply"))["vertex"]
    timings = json.loads((run / "metrics.json").read_text())["timings"]
    return {n: v[n].copy() for n in v.data.dtype.names}, timings, made[0]


def test_a_run_that_switches_mid_run_equals_one_compiled_before_its_first_step(tmp_path, monkeypatch):
    key = "PipelineParams.compile_in_background"
    ahead, ahead_timings, ahead_prior = _run(tmp_path, "ahead", monkeypatch, f"{key}=false")
    switched, timings, prior = _run(tmp_path, "background", monkeypatch, f"{key}=true")
    assert ahead_prior.compiled_calls == ahead_prior.calls > 0  # every call compiled
    assert "compiled_from_step" not in ahead_timings and "prior_compiled" in ahead_timings
    # the background run switched in the middle: some calls uncompiled, the later ones compiled
    assert 0 < prior.compiled_calls < prior.calls
    step = timings["compiled_from_step"]
    assert 1 < step < 16
    assert {"compiled_iteration", "ms_per_iteration_uncompiled", "ms_per_iteration_compiled"} <= timings.keys()
    assert timings["compiled_iteration"] >= timings["first_iteration"]
    assert ahead.keys() == switched.keys()
    for name in ahead:
        assert (ahead[name] == switched[name]).all(), name


def test_a_training_step_draws_nothing_from_the_global_generators(tiny_sd_dir):
    """Posterior samples of the VAE encoder and the children of split Gaussians come from the trainer's
    noise generator: a background compilation restores the global states when Dynamo finishes a frame."""
    cfg = load_config(None, [
        f"GuidanceParams.model_key={tiny_sd_dir}", "GuidanceParams.C_batch_size=2", "GuidanceParams.precision=fp32",
        "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=200",
        "OptimizationParams.densify_from_iter=1", "OptimizationParams.densification_interval=2",
        "OptimizationParams.densify_grad_threshold=0.0", "OptimizationParams.percent_dense=0.0",
        "PipelineParams.device=cpu",
    ], warn_no_effect=False)
    prior = StableDiffusionPrior.from_config(cfg.guidance, "cpu")
    apply_pipeline_options(prior, cfg.pipeline)
    trainer = Trainer(cfg, prior=prior, device=torch.device("cpu"))
    before = torch.get_rng_state()
    n0 = trainer.gaussians.num_points
    for step in (1, 2, 3):
        trainer.train_step(step)
        trainer.step = step
    assert trainer.gaussians.num_points > n0  # the densification at step 2 split (and cloned) Gaussians
    assert torch.equal(torch.get_rng_state(), before)
