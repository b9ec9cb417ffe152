"""The two files a sweep adds to a run folder: done.json (written last, after every output of the run) and
failed.json (the error and the path of the run's log). Readers: the workers (what is left to do) and
the report."""
from __future__ import annotations

import json
from pathlib import Path

from utils.files import atomic_write_text

DONE = "done.json"
FAILED = "failed.json"


def read_marker(run_dir: Path, name: str) -> dict | None:
    try:
        return json.loads((run_dir / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def mark_done(run_dir: Path, record: dict) -> None:
    (run_dir / FAILED).unlink(missing_ok=True)
    atomic_write_text(run_dir / DONE, json.dumps(record, indent=2) + "\n")


def mark_failed(run_dir: Path, record: dict) -> None:
    atomic_write_text(run_dir / FAILED, json.dumps(record, indent=2) + "\n")


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE).is_file()


def failed_in(run_dir: Path, launch: str) -> bool:
    """True when the run failed in this launch (a later launch retries it)."""
    record = read_marker(run_dir, FAILED)
    return record is not None and record.get("launch") == launch
