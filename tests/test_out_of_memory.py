"""Out of GPU memory mid-run and Ctrl-C: one message saying where it stopped, what was kept and what to do.

CPU tests inject torch.cuda.OutOfMemoryError at the render, the prior and the backward; the GPU test
(run where CUDA is) makes a real one with torch.cuda.set_per_process_memory_fraction.
"""
from pathlib import Path

import pytest
import torch

import train
from guidance.analytic_prior import AnalyticPrior
from tests.test_train import TINY
from training import trainer as trainer_module
from training.trainer import Trainer

EXTRA = ["save_video=false", "export_mesh=false", "OptimizationParams.iterations=4", "checkpoint_interval=2"]


def _run(out: Path, *extra) -> int:
    return train.main(["--quiet", f"output_dir={out}", *TINY, *EXTRA, *extra])


def _messages(capsys) -> str:
    """What train.py wrote on the console (its logging handler writes to stderr)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err  # a message, not a traceback
    return err


def _run_dirs(out: Path) -> list[Path]:
    return [p for p in out.glob("*/*") if p.is_dir()] if out.exists() else []


def _inject(monkeypatch, where: str, step: int) -> None:
    """CUDA's out-of-memory error from `where` ("render", "prior" or "backward") during training step `step`."""
    current = {"step": None}
    compute_gradients = Trainer.compute_gradients

    def tracked(self, at_step):
        current["step"] = at_step
        try:
            return compute_gradients(self, at_step)
        finally:
            current["step"] = None

    def failing(function):
        def wrapper(*args, **kwargs):
            if current["step"] == step:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Trainer, "compute_gradients", tracked)
    if where == "render":  # the training render
        monkeypatch.setattr(trainer_module, "render", failing(trainer_module.render))
    elif where == "prior":  # the prior's encoder
        monkeypatch.setattr(AnalyticPrior, "encode", failing(AnalyticPrior.encode))
    else:  # the backward of the step's loss
        monkeypatch.setattr(torch.Tensor, "backward", failing(torch.Tensor.backward))


@pytest.mark.parametrize("where", ["render", "prior", "backward"])
def test_out_of_memory_mid_run_names_the_step_the_levers_and_the_checkpoint_kept(tmp_path, capsys, monkeypatch,
                                                                                  where):
    _inject(monkeypatch, where, step=3)
    assert _run(tmp_path) == 1
    text = _messages(capsys)
    for part in ("out of GPU memory at step 3", "peak GPU memory not measured (no CUDA device in use)",
                 "--overlay config/low_vram.yaml", "GuidanceParams.C_batch_size (now 2)",
                 "GenerateCamParams.image_w / image_h (now 32x32)", "the checkpoint of step 2 is kept",
                 "python train.py --resume"):
        assert part in text, (part, text)
    (run,) = _run_dirs(tmp_path)
    assert f"--resume {run}" in text
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert not (run / "point_cloud.ply").exists()  # no final outputs from a half-done step


def test_out_of_memory_at_the_first_step_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, "prior", step=1)
    assert _run(tmp_path) == 1
    text = _messages(capsys)
    assert "out of GPU memory at step 1" in text and "no step was completed and the run folder" in text, text
    assert "checkpoint of step" not in text
    assert _run_dirs(tmp_path) == []


def test_a_low_vram_run_is_not_told_to_use_the_low_vram_overlay(tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, "render", step=1)
    assert _run(tmp_path, "PipelineParams.encode_chunk=1", "PipelineParams.attention_slicing=true") == 1
    text = _messages(capsys)
    assert "config/low_vram.yaml" not in text and "attention_slicing" not in text, text
    assert "C_batch_size (now 2)" in text, text


def _interrupt_at(monkeypatch, at_step: int) -> None:
    original = Trainer.train_step

    def interrupted(self, step, **kwargs):
        if step == at_step:
            raise KeyboardInterrupt  # what a second Ctrl-C raises from the signal handler
        return original(self, step, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", interrupted)


def test_ctrl_c_before_any_checkpoint_does_not_claim_one(tmp_path, capsys, monkeypatch):
    _interrupt_at(monkeypatch, 2)  # step 1 done, the first checkpoint is due at step 2
    assert _run(tmp_path) == 130
    text = _messages(capsys)
    assert "interrupted after step 1: no checkpoint was written, so the run cannot be resumed" in text, text
    assert "intact" not in text and "is kept" not in text
    (run,) = _run_dirs(tmp_path)
    assert not (run / "checkpoints" / "last.pt").exists()


def test_ctrl_c_at_the_first_step_says_the_folder_was_removed(tmp_path, capsys, monkeypatch):
    _interrupt_at(monkeypatch, 1)
    assert _run(tmp_path) == 130
    text = _messages(capsys)
    assert "interrupted after step 0: no step was completed and the run folder" in text, text
    assert _run_dirs(tmp_path) == []


def test_ctrl_c_after_a_checkpoint_names_it_and_the_resume_command(tmp_path, capsys, monkeypatch):
    _interrupt_at(monkeypatch, 4)
    assert _run(tmp_path) == 130
    (run,) = _run_dirs(tmp_path)
    text = _messages(capsys)
    assert f"the checkpoint of step 2 is kept; continue with: python train.py --resume {run}" in text, text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_out_of_memory_on_the_gpu_is_reported(tmp_path, capsys):
    """A run whose renders cannot fit in 0.5% of the GPU (about 400 MiB of an 80 GiB card; the 64 RGB
    renders of 1024x1024 alone take 768 MiB): exit 1, the message, and a measured peak."""
    torch.cuda.set_per_process_memory_fraction(0.005)
    try:
        code = _run(tmp_path, "PipelineParams.device=cuda", "GuidanceParams.C_batch_size=64",
                    "GenerateCamParams.image_w=1024", "GenerateCamParams.image_h=1024")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert code == 1
    text = _messages(capsys)
    assert "out of GPU memory" in text and "GiB allocated by PyTorch of" in text, text
    assert "GuidanceParams.C_batch_size (now 64)" in text, text
