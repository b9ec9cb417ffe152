"""Claim files: how any number of workers, on any number of hosts, share one sweep folder without a
coordinator.

A worker owns a run while it holds <sweep>/.claims/<loss>/<run>.json. The file is created with
O_CREAT | O_EXCL, which exactly one process can win (also on NFS v3+ and Lustre, where O_EXCL is
atomic on the server). The owner refreshes a heartbeat in it every `heartbeat_s` seconds from a thread.
A claim is stale when its owner's pid is gone on this same host, or when its heartbeat is older than
`stale_after_s` (another host: the clocks must roughly agree, as NTP keeps them). Taking a stale claim
over is a second O_EXCL race, on <claim>.takeover-<stale token> (kept afterwards): only one worker
ever wins the right to replace that particular stale claim, so two workers never both take it, even
one that judged it stale late.

What is left: an owner that is alive but stalled past `stale_after_s` (e.g. a frozen NFS mount) can
lose its claim to another worker, and both may then train the same run; the run folder's checkpoints
and done marker are written atomically, so the result is one complete run either way.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from training.lock import process_alive
from utils.files import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    name: str
    path: Path
    token: str


class ClaimStore:
    """Claims under `folder`; `owner` is recorded in each claim (e.g. rank, launch id)."""

    def __init__(self, folder: Path, stale_after_s: float = 600.0, heartbeat_s: float = 30.0,
                 owner: dict | None = None):
        if heartbeat_s <= 0 or stale_after_s <= heartbeat_s:
            raise ValueError(f"need 0 < heartbeat_s < stale_after_s, got {heartbeat_s}, {stale_after_s}")
        self.folder = Path(folder)
        self.stale_after_s, self.heartbeat_s = float(stale_after_s), float(heartbeat_s)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), **(owner or {})}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _record(self, token: str) -> str:
        now = time.time()
        return json.dumps({**self.owner, "token": token, "heartbeat": now}) + "\n"

    def read(self, name: str) -> dict | None:
        """The claim's content; {} for a claim being written; None when unclaimed."""
        try:
            text = self.path(name).read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {}

    def is_stale(self, record: dict, path: Path) -> bool:
        if not record:  # created but not yet written: judge by the file's age
            try:
                return time.time() - path.stat().st_mtime > self.stale_after_s
            except FileNotFoundError:
                return False
        if record.get("host") == self.owner["host"] and not process_alive(int(record.get("pid", -1))):
            return True
        return time.time() - float(record.get("heartbeat", 0.0)) > self.stale_after_s

    def held_by_other(self, name: str) -> bool:
        """True while a live worker (not this one) holds the run."""
        record = self.read(name)
        return record is not None and not self.is_stale(record, self.path(name))

    def try_claim(self, name: str) -> Claim | None:
        """The claim if this worker now owns `name` (fresh, or taken over from a stale owner), else None."""
        path, token = self.path(name), uuid.uuid4().hex
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over(name, token)
        with os.fdopen(fd, "w") as f:
            f.write(self._record(token))
        return Claim(name, path, token)

    def _take_over(self, name: str, token: str) -> Claim | None:
        path = self.path(name)
        record = self.read(name)
        if record is None:  # released meanwhile: try again from the start
            return self.try_claim(name)
        if not self.is_stale(record, path):
            return None
        try:
            stale_token = record.get("token") or f"unwritten-{path.stat().st_mtime_ns}"
            # kept afterwards: a worker that judged the same stale claim late must still lose
            lock = path.with_name(f"{path.name}.takeover-{stale_token}")
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except (FileExistsError, FileNotFoundError):
            return None  # another worker won this takeover, or the claim was just released
        log.warning("taking over stale claim %s (owner %s pid %s, heartbeat %.0f s ago)", name, record.get("host"),
                    record.get("pid"), time.time() - float(record.get("heartbeat", 0.0)))
        atomic_write_text(path, self._record(token))
        return Claim(name, path, token)

    def owns(self, claim: Claim) -> bool:
        record = self.read(claim.name)
        return bool(record) and record.get("token") == claim.token

    def heartbeat(self, claim: Claim) -> bool:
        """Refresh the heartbeat; False (and nothing written) when the claim was taken over."""
        if not self.owns(claim):
            return False
        atomic_write_text(claim.path, self._record(claim.token))
        return True

    def release(self, claim: Claim) -> None:
        if self.owns(claim):
            claim.path.unlink(missing_ok=True)


class Heartbeat:
    """Context manager: refreshes a claim every heartbeat_s seconds from a daemon thread."""

    def __init__(self, store: ClaimStore, claim: Claim):
        self.store, self.claim = store, claim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {claim.name}", daemon=True)
        self.lost = False

    def _beat(self) -> None:
        while not self._stop.wait(self.store.heartbeat_s):
            if not self.store.heartbeat(self.claim):
                self.lost = True
                log.error("claim on %s was taken over by another worker (this one stalled past %.0f s)",
                          self.claim.name, self.store.stale_after_s)
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
