"""Checkpoint files: read without executing code (written atomically by run_dir.atomic_torch_save).

A checkpoint holds only tensors and primitives (dicts, lists, tuples, numbers, strings), so it
loads with ``torch.load(weights_only=True)``: a run folder received from someone else cannot run
code on this machine when resumed.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoints/last.pt"


class CheckpointError(Exception):
    """A checkpoint file is missing, damaged or not one this program wrote."""


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, loaded with weights_only=True on the CPU; CheckpointError naming the
    file and what is wrong when it is missing, truncated or holds anything but tensors and primitives."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run stopped before its first checkpoint "
                              "(start a new run instead)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is damaged or was not written by train.py ({type(exc).__name__}: {first_line}); "
            "it cannot be resumed: start a new run, or restore the file from a backup") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a train.py checkpoint (no 'step' entry)")
    return state
