"""Prompt lists: a YAML list (strings, or {text, negative} entries) or a text file with one prompt per
line; and the file-system names (slugs) of their prompts."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from utils.config import ConfigError

SLUG_LENGTH = 60


@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str | None = None  # None: the base config's GuidanceParams.negative


def _prompt_entry(entry, where: str) -> Prompt:
    if isinstance(entry, str):
        entry = {"text": entry}
    if not isinstance(entry, dict) or set(entry) - {"text", "negative"}:
        raise ConfigError(f"{where}: a prompt is a string or a mapping with keys text (and negative), got {entry!r}")
    text, negative = entry.get("text"), entry.get("negative")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: prompt text must be a non-empty string, got {text!r}")
    if negative is not None and not isinstance(negative, str):
        raise ConfigError(f"{where}: negative must be a string, got {negative!r}")
    return Prompt(text.strip(), negative)


def load_prompts(path: str | Path) -> list[Prompt]:
    """A text file (one prompt per line; blank lines and lines starting with '#' skipped) or a YAML file:
    a list (or {prompts: list}) of strings or {text, negative} mappings."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"prompt list {path} is a folder, not a file; pass a text file (one prompt per line) "
                          "or a YAML list")
    if not path.is_file():
        raise ConfigError(f"prompt list {path.resolve()} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompt list {path} is not UTF-8 text (byte {exc.start}): a binary file? pass a text "
                          "file (one prompt per line) or a YAML list, saved as UTF-8") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"prompt list {path} is not valid YAML ({str(exc).splitlines()[0]}); write a YAML "
                              "list of prompts, or use a .txt file with one prompt per line") from None
        if isinstance(data, dict) and set(data) == {"prompts"}:
            data = data["prompts"]
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a list of prompts (or a mapping 'prompts: [...]')")
        prompts = [_prompt_entry(e, f"{path} item {i + 1}") for i, e in enumerate(data)]
    else:
        lines = text.splitlines()
        prompts = [Prompt(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    seen = set()
    for p in prompts:
        if p.text in seen:
            raise ConfigError(f"{path}: prompt {p.text!r} is listed twice")
        seen.add(p.text)
    return prompts


def slugify(text: str, length: int = SLUG_LENGTH) -> str:
    """'A DSLR photo of a red-eyed frog!' -> 'a_dslr_photo_of_a_red_eyed_frog' (lower case, [a-z0-9_])."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:length].rstrip("_") or "prompt"


def unique_slugs(prompts: Sequence[Prompt]) -> list[str]:
    """One slug per prompt; prompts whose slugs collide get _2, _3, ... in list order."""
    out, used = [], set()
    for p in prompts:
        base = slug = slugify(p.text)
        k = 2
        while slug in used:
            slug, k = f"{base}_{k}", k + 1
        used.add(slug)
        out.append(slug)
    return out
