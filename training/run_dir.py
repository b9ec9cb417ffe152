"""The run folder: where everything a run produces lands, never overwriting an earlier run."""
from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.files import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def git_commit(repo: Path = REPO_ROOT) -> dict | None:
    """{"commit": sha, "dirty": uncommitted changes?} of the code that runs; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_metadata(run_dir: Path, argv: list[str]) -> None:
    (run_dir / "command.txt").write_text(shlex.join([sys.executable, *argv]) + "\n")
    info = {**environment_info(), "git": git_commit()}
    (run_dir / "environment.json").write_text(json.dumps(info, indent=2) + "\n")


def append_command(run_dir: Path, argv: list[str]) -> None:
    """Record a resume command after the original one."""
    with open(run_dir / "command.txt", "a") as f:
        f.write(shlex.join([sys.executable, *argv]) + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def host_copy(obj):
    """obj (dicts, lists, tuples of tensors and plain values) with every tensor copied to host memory, a new
    tensor even when it is there already: a snapshot the training loop cannot change while a background
    thread writes it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: host_copy(value) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(host_copy(value) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(value) for value in obj)
    return obj
