"""Integrity of a local diffusers Stable Diffusion folder, checked without loading any weight.

A folder whose files are all present but one is damaged (a truncated download, an interrupted
copy, a config edited by hand) must be reported as damaged, naming the file and what is wrong,
not as "model not found".
"""
from __future__ import annotations

import json
import os
import struct

from guidance.prior import ModelNotFoundError

CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


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
