"""Files written so that a crash never leaves a half-written one under the final name."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
LOW_SPACE_BYTES = 1 << 20  # below this, a failed write is taken for a full disk whatever the writer raised
# unique_temp_path's names: "." + stem + "." + mkstemp's 8 random characters + ".tmp" + suffix
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^./]+)?$")


class DiskFullError(OSError):
    """A file could not be written because its file system has no space left (or the quota is used up)."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, "No space left on device", str(path))
        self.path = Path(path)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether exc (or an exception it was raised from) is ENOSPC / EDQUOT."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged writer may still use on folder's file system (None when unknown)."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _failed_for_space(exc: BaseException, folder: Path) -> bool:
    """A write that raised exc failed because the disk is full: ENOSPC, or (torch.save and ffmpeg report
    it as RuntimeError / BrokenPipeError) hardly any space left right after the failure."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
        return False
    if is_disk_full(exc):
        return True
    free = free_bytes(folder)
    return free is not None and free < LOW_SPACE_BYTES


def unique_temp_path(path: Path) -> Path:
    """A fresh empty file next to `path` (same folder, so the final rename is atomic) named after it;
    unique, so two writers (processes or threads) never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[Path], None], mode: int = 0o644) -> None:
    """write(tmp) to a unique temporary file, give it `mode` (mkstemp creates 0600; written files are for
    other users too), then rename it over `path`: the old file survives a crash.

    A write that fails because the disk is full raises DiskFullError naming `path` (whatever the writer
    raised), with the temporary file removed.
    """
    tmp = unique_temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        full = not isinstance(exc, DiskFullError) and _failed_for_space(exc, tmp.parent)  # before freeing tmp
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(path) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files atomic_write left under `folder` when its process was killed mid-write
    (e.g. `.last.k3j2_x9a.tmp.pt`); returns them. Only for a folder no live process writes to (a run
    folder under its lock)."""
    stale = sorted(p for p in folder.rglob(".*.tmp*") if p.is_file() and TEMP_NAME.match(p.name))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
