"""One training process per run folder: a lock file holding the owner's pid and host."""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class RunLockedError(RuntimeError):
    """Another live process is training this run folder."""


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """Context manager: creates run_dir/train.lock atomically (O_EXCL), removes it on exit.

    A lock left by a process that no longer runs on this host (killed, machine rebooted) is stale
    and taken over with a warning; a lock from another host cannot be checked and is refused.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        return True

    def acquire(self) -> None:
        if self._create():
            return
        owner = self._owner()
        pid, host = owner.get("pid"), owner.get("host")
        here = host == socket.gethostname()
        if isinstance(pid, int) and (not here or process_alive(pid)):
            where = "this machine" if here else f"host {host!r}"
            raise RunLockedError(
                f"run folder {self.path.parent} is being trained by process {pid} on {where} (lock file {self.path}); "
                "wait for it to finish or stop it. If that process is gone, delete the lock file")
        log.warning("removing the stale lock %s left by process %s, which no longer runs", self.path, pid)
        self.path.unlink(missing_ok=True)
        if not self._create():
            raise RunLockedError(f"run folder {self.path.parent} was locked by another process just now ({self.path})")

    def release(self) -> None:
        if self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
