"""Out of GPU memory mid-run: one message that says where, how much, what was kept and what to lower.

torch raises torch.cuda.OutOfMemoryError (== torch.OutOfMemoryError) from whichever kernel could not
allocate: the render, the prior's VAE/UNet or the backward. Its own text ("Tried to allocate ...") names
none of the settings of this program, so the run turns it into :class:`OutOfMemoryStop` (exit code 1).
"""
from __future__ import annotations

from pathlib import Path

import torch

from training.health import TrainingStopped
from training.stop import on_disk_after_stop
from utils.config import Config

LOW_VRAM_OVERLAY = "config/low_vram.yaml"
GIB = 1024 ** 3


class OutOfMemoryStop(TrainingStopped):
    """The device ran out of memory; the message names the step, the peak and the settings that lower it."""


def peak_memory_text(device: torch.device | None) -> str:
    """'peak 7.91 GiB allocated of 79.1 GiB on cuda:0', or why no peak is known."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "peak GPU memory not measured (no CUDA device in use)"
    peak = torch.cuda.max_memory_allocated(device) / GIB
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    return f"peak {peak:.2f} GiB allocated by PyTorch of {total:.1f} GiB on {device}"


def memory_levers(cfg: Config) -> str:
    """The settings that lower the memory of a run, with their current values."""
    cam, pipe = cfg.camera, cfg.pipeline
    levers = []
    if not pipe.encode_chunk:
        levers.append(f"--overlay {LOW_VRAM_OVERLAY} (PipelineParams.encode_chunk=1: the VAE encoder's "
                      "backward one image at a time)")
    levers.append(f"a smaller GuidanceParams.C_batch_size (now {cfg.guidance.C_batch_size})")
    levers.append(f"a smaller image, GenerateCamParams.image_w / image_h (now {cam.image_w}x{cam.image_h})")
    if not pipe.attention_slicing:
        levers.append("PipelineParams.attention_slicing=true")
    return "; ".join(levers)


def where_text(step: int | None, iterations: int) -> str:
    """The step that failed: `step` is the last completed one (None: before the first step was built)."""
    if step is None:
        return "while building the run, before step 1"
    if step >= iterations:
        return f"while writing the final outputs after step {step}"
    return f"at step {step + 1}"


def kept_text(cfg: Config, run_dir: Path, checkpoint_step: int | None, removed: bool) -> str:
    """What is on disk now, and how to go on from it."""
    text = on_disk_after_stop(run_dir, checkpoint_step, removed)
    if checkpoint_step is not None and not removed and not cfg.pipeline.attention_slicing:
        # utils/config/resume.py: the one memory setting a resumed run may change
        text += " PipelineParams.attention_slicing=true (the other settings change the run: lower them in a new run)"
    return text


def out_of_memory_message(cfg: Config, device: torch.device | None, step: int | None, run_dir: Path | None,
                          checkpoint_step: int | None = None, removed: bool = False) -> str:
    """The whole message; `step` is the last completed step, `run_dir` None on a process that writes none."""
    parts = [f"out of GPU memory {where_text(step, cfg.optim.iterations)}", peak_memory_text(device),
             f"lower the memory with: {memory_levers(cfg)}"]
    if run_dir is not None:
        parts.append(kept_text(cfg, run_dir, checkpoint_step, removed))
    return ". ".join(parts)
