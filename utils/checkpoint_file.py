"""Checkpoint files: read without executing code (written atomically by run_dir.atomic_torch_save).

A checkpoint holds only tensors and primitives (dicts, lists, tuples, numbers, strings), so it
loads with ``torch.load(weights_only=True)``: a run folder received from someone else cannot run
code on this machine when resumed, relaunched by a sweep, exported or evaluated. This module is the
product's one reader of ``.pt`` files (tests/test_checkpoint_safety.py fails on any other); it lives in
utils/ so that export/ and evaluation/ read checkpoints without importing the training engine.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoints/last.pt"


class CheckpointError(Exception):
    """A checkpoint file is missing, damaged or not one this program wrote."""


def load_tensor_file(path: Path, what: str = "checkpoint") -> object:
    """The tensors and primitives in the .pt file at `path` (weights_only=True, on the CPU).
    CheckpointError naming `what`, the file and what to do when it is unreadable, damaged, or holds
    anything else (a pickle that would import or call code is refused, never run)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except IsADirectoryError:
        raise CheckpointError(f"{what} {path} is a folder, not a .pt file; pass the file") from None
    except PermissionError:
        raise CheckpointError(f"{what} {path} cannot be read (permission denied)") from None
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{what} {path} is damaged or was not written by this program ({type(exc).__name__}: {first_line}); "
            "it holds more than tensors and plain values, or is truncated: it is not loaded (nothing in it was "
            "run); restore the file from a backup, or start a new run") from None


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, loaded with weights_only=True on the CPU; CheckpointError naming the
    file and what is wrong when it is missing, truncated or holds anything but tensors and primitives."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run stopped before its first checkpoint "
                              "(start a new run instead)")
    state = load_tensor_file(path)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a train.py checkpoint (no 'step' entry)")
    return state
