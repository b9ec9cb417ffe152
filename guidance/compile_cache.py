"""Portable compile cache: the compiled UNet and VAE-encoder programs kept in the user's cache folder.

torch.compile keeps its programs in Inductor's and Triton's on-disk caches (by default under /tmp), so a
run on a machine that compiled before starts in seconds, while a fresh machine (a new cloud instance, a
cluster node whose /tmp is its own) compiles for minutes again (issue 20). `torch.compiler`'s cache
artifacts ("mega-cache": the FX graphs, AOTAutograd entries and Triton kernels one process compiled or
found) serialise into one file; loading that file in another process fills the local caches before
compiling, so that the compilation finds its programs there. This module keeps one such file per setup
(torch, Triton and CUDA versions, the GPU, and what the caller says decides the programs: the networks'
configs, dtype, shapes, compile options) in a folder, by default the user's cache (a home folder that a
cluster's nodes share). An artifact that does not fit (other code, another GPU) only misses the cache:
Inductor's own keys decide every hit, the file name only keeps setups apart.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from utils.files import atomic_write_bytes

__all__ = ["PortableCompileCache", "default_cache_folder", "setup_key"]

logger = logging.getLogger(__name__)

# per file, the artifacts this process loaded from it or saved to it: a sweep's runs share one prior, so the
# second run neither loads the file again nor rewrites it
_IN_PROCESS: dict[Path, set[tuple[str, str]]] = {}


def default_cache_folder() -> Path:
    """$XDG_CACHE_HOME/segmentdreamer/compile (~/.cache/segmentdreamer/compile without it)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "segmentdreamer" / "compile"


def setup_key(device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """What the file name depends on: library versions, the GPU and the caller's `settings` (JSON-able)."""
    key: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "settings": settings}
    try:
        import triton

        key["triton"] = triton.__version__
    except ImportError:
        key["triton"] = None
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
        key["capability"] = list(torch.cuda.get_device_capability(device))
    return key


def _artifact_names(info: Any) -> set[tuple[str, str]]:
    """(kind, key) of every artifact a torch.compiler CacheInfo lists."""
    artifacts = getattr(info, "artifacts", None) or {}
    return {(kind, str(name)) for kind, names in artifacts.items() for name in names}


class PortableCompileCache:
    """One setup's cache-artifact file in `folder`: `load()` before compiling, `save()` after."""

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any]):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.folder = Path(folder).expanduser()
        self.path = self.folder / f"{digest}.bin"

    def load(self) -> int:
        """Fill the local compile caches from the file; the number of artifacts it held (0: no file, or one
        that could not be read, which is logged and left to be replaced by `save`). Once per file and process."""
        if self.path in _IN_PROCESS:
            return len(_IN_PROCESS[self.path])
        _IN_PROCESS[self.path] = set()
        if not self.path.is_file():
            logger.info("compile cache: no programs saved for this setup yet (%s)", self.path)
            return 0
        t0 = time.perf_counter()
        try:
            data = self.path.read_bytes()
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # a truncated or foreign file must not stop the run: it only compiles longer
            logger.warning("compile cache: could not load %s (%s: %s); compiling without it", self.path,
                           type(exc).__name__, exc)
            return 0
        if info is None:  # torch logs why (another torch version's format, a checksum that does not match)
            logger.warning("compile cache: %s is not a cache file this torch can read; compiling without it",
                           self.path)
            return 0
        _IN_PROCESS[self.path] = _artifact_names(info)
        logger.info("compile cache: %d programs (%.1f MB) loaded from %s in %.1f s", len(_IN_PROCESS[self.path]),
                    len(data) / 1e6, self.path, time.perf_counter() - t0)
        return len(_IN_PROCESS[self.path])

    def save(self) -> int:
        """Write what this process compiled or found, when the file lacks some of it; the number of artifacts
        written (0: nothing new). The write is atomic (utils.files.atomic_write_bytes), so a crash or a second
        process writing at the same moment never leaves a partial file."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return 0
        data, info = saved
        names = _artifact_names(info)
        if not names or names <= _IN_PROCESS.get(self.path, set()):
            return 0
        t0 = time.perf_counter()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, data)
        except OSError as exc:  # a read-only or full cache folder costs the next run time, not this run
            logger.warning("compile cache: could not write %s (%s); the next fresh machine compiles again",
                           self.path, exc)
            return 0
        _IN_PROCESS[self.path] = names
        logger.info("compile cache: %d programs (%.1f MB) saved to %s in %.1f s", len(names), len(data) / 1e6,
                    self.path, time.perf_counter() - t0)
        return len(names)

