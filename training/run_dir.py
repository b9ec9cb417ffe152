"""The run folder: where everything a run produces lands, never overwriting an earlier run."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def new_run_dir(root: Path, workspace: str, name: str) -> Path:
    """root/workspace/name_<timestamp>[_k]: a fresh folder; an existing one is never reused."""
    base = root / workspace / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, k = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            candidate = base.with_name(f"{base.name}_{k}")
            k += 1


def environment_info() -> dict:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("diffusers", "transformers", "gsplat", "numpy"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            info[name] = None
    return info


def write_run_metadata(run_dir: Path, argv: list[str]) -> None:
    (run_dir / "command.txt").write_text(shlex.join([sys.executable, *argv]) + "\n")
    (run_dir / "environment.json").write_text(json.dumps(environment_info(), indent=2) + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: the old file survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
