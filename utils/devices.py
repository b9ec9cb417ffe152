"""The compute device named by PipelineParams.device."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PipelineParams.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
