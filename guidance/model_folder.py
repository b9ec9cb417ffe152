"""Integrity of a local diffusers Stable Diffusion folder, checked without loading any weight; and the
read-ahead of its weight files while the program is still importing.

A folder whose files are all present but one is damaged (a truncated download, an interrupted
copy, a config edited by hand) must be reported as damaged, naming the file and what is wrong,
not as "model not found".

This module imports nothing heavy: train.py starts the read-ahead before it imports the training code,
diffusers and transformers.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time

from utils.hub import ModelNotFoundError, hub_cache_dir  # not guidance.prior: that imports torch

CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_READ_AHEAD_CHUNK = 16 << 20  # bytes per read() of the read-ahead thread

logger = logging.getLogger(__name__)


class ModelCorruptError(ModelNotFoundError):
    """The model folder is there but one of its files is damaged."""


def json_problem(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not valid JSON ({exc})"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None if isinstance(data, dict) else f"holds a JSON {type(data).__name__}, not an object"


def safetensors_problem(path: str) -> str | None:
    """Check the safetensors header (8-byte length + JSON) and that the file holds every tensor's bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, no safetensors header)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"truncated or not a safetensors file (header of {header_len} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "damaged safetensors header (not JSON)"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        return f"truncated: {size} bytes, the tensors need {needed}"
    return None


def weights_problem(folder: str, component: str) -> str | None:
    names = WEIGHT_FILES[component]
    present = [n for n in names if os.path.isfile(os.path.join(folder, component, n))]
    if not present:
        return f"{component}/: no weights file (expected {' or '.join(names)})"
    if present[0].endswith(".safetensors"):
        problem = safetensors_problem(os.path.join(folder, component, present[0]))
        return f"{component}/{present[0]}: {problem}" if problem else None
    return None


def folder_problems(folder: str, weights: bool = True) -> list[str]:
    """Every damaged or missing file of a diffusers SD folder ("file: what is wrong"); [] when intact.
    weights=False checks only the configs (a base_model_key folder supplies no weights)."""
    problems = []
    for name in CONFIG_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: missing")
        elif (problem := json_problem(path)) is not None:
            problems.append(f"{name}: {problem}")
    if weights:
        problems += [p for component in WEIGHT_FILES if (p := weights_problem(folder, component)) is not None]
    return problems


def check_model_folder(key_name: str, folder: str, weights: bool = True) -> None:
    """ModelCorruptError listing the damaged files of a local model folder."""
    problems = folder_problems(folder, weights)
    if problems:
        lines = [f"Stable Diffusion model folder GuidanceParams.{key_name} = {folder!r} is damaged:"]
        lines += [f"  - {p}" for p in problems]
        lines.append("Copy or download the damaged files again (the rest of the folder can stay).")
        raise ModelCorruptError("\n".join(lines))


def weight_files(model_key: str | None, is_safe_tensor: bool = False) -> list[str]:
    """The weight files a load of `model_key` reads: a single-file checkpoint, or the UNet, VAE and text-encoder
    files of a local diffusers folder or of a hub id's snapshot in the local Hugging Face cache (safetensors
    first, as diffusers and transformers choose). [] for a URL, a hub id not cached or a path that is not
    there: the pre-flight check reports those."""
    if not model_key:
        return []
    path = os.path.expanduser(str(model_key))
    if is_safe_tensor or path.lower().endswith(SINGLE_FILE_SUFFIXES):
        return [path] if os.path.isfile(path) else []
    if not os.path.isdir(path):
        path = cached_snapshot(path) or path
    files = []
    for component, names in WEIGHT_FILES.items():
        present = [os.path.join(path, component, n) for n in names if os.path.isfile(os.path.join(path, component, n))]
        files += present[:1]
    return files


def cached_snapshot(repo_id: str) -> str | None:
    """The folder of a hub id's cached snapshot (its default revision), without any network access; None if
    not cached or not a valid id."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=hub_cache_dir())
    except ValueError:  # not a valid repository id (huggingface_hub's HFValidationError)
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def read_ahead(paths: list[str]) -> threading.Thread | None:
    """Read `paths` once in a daemon thread, so that the operating system's page cache holds them when the
    loaders map them (diffusers and transformers memory-map safetensors and fault the pages in one by one).

    A model read for the first time (a new machine, a fresh download, a cache evicted since the last run)
    then comes off the disk while the program imports the training code, diffusers and transformers
    (seconds, issue 20: bench/model_load.py --cold) instead of after. The reads release the GIL, so the
    imports go on meanwhile; a model already cached costs next to nothing (the bytes go to /dev/null inside
    the kernel). Read errors are left to the loaders, which report them; the weights are not changed or
    kept, so the run's numbers are the same with or without it."""
    if not paths:
        return None

    def read() -> None:
        t0, total = time.perf_counter(), 0
        try:
            for path in paths:
                total += _read_into_page_cache(path)
        except OSError as exc:
            logger.debug("read-ahead of the model's weights stopped: %s", exc)
            return
        logger.debug("read ahead %.2f GB of model weights in %.1f s", total / 1e9, time.perf_counter() - t0)

    thread = threading.Thread(target=read, name="weights-read-ahead", daemon=True)
    thread.start()
    return thread


def _read_into_page_cache(path: str) -> int:
    """Read the whole file once; returns its bytes. sendfile to /dev/null reads without a copy to user
    space (Linux); where the system refuses it (e.g. macOS: sockets only), plain reads into one buffer."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f, open(os.devnull, "wb", buffering=0) as sink:
        offset = 0
        try:
            while offset < size and (n := os.sendfile(sink.fileno(), f.fileno(), offset, size - offset)):
                offset += n
            return offset
        except (OSError, AttributeError):  # AttributeError: no os.sendfile on this platform
            f.seek(offset)
        buffer = bytearray(_READ_AHEAD_CHUNK)
        while n := f.readinto(buffer):
            offset += n
        return offset
