"""Files written so that a crash never leaves a half-written one under the final name."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def unique_temp_path(path: Path) -> Path:
    """A fresh empty file next to `path` (same folder, so the final rename is atomic) named after it;
    unique, so two writers (processes or threads) never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[Path], None], mode: int = 0o644) -> None:
    """write(tmp) to a unique temporary file, give it `mode` (mkstemp creates 0600; written files are for
    other users too), then rename it over `path`: the old file survives a crash."""
    tmp = unique_temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
