"""One error contract for every command (train.py, training.sweep, training.sweep.report, export.mesh,
evaluation.fid, evaluation.clip_score): a user error is one message naming the file or key, what is
wrong and what to do; exit code 2; no traceback; nothing left behind (writers use utils/files.py).

A command's main() runs its body through `run_command`, which turns the known user-error types into
that message. Readers of a user's files raise `InputError` (or ConfigError for config keys); code
that calls a reader which raises OSError/ValueError wraps the call in `reading(...)`.
"""
from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from utils.checkpoint_file import CheckpointError
from utils.config import ConfigError
from utils.hub import ModelNotFoundError

EXIT_USER_ERROR = 2


class InputError(Exception):
    """A file or folder given to a command is missing, of the wrong kind, or holds nothing usable."""


# errors of the machine's file system that a user fixes (a path, a permission, space), not bugs
_ENVIRONMENT_ERRNOS = {
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOSPC: "no space left on the device: free some space or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another folder",
    errno.EEXIST: "a file is in the way where a folder must be created: remove it or choose another path",
    errno.ENOTDIR: "a file is in the way where a folder must be: remove it or choose another path",
    errno.EISDIR: "it is a folder where a file is expected: pass a file",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
}


def user_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The exception types every command reports as a message, plus a command's own `extra` ones."""
    return (ConfigError, CheckpointError, ModelNotFoundError, InputError, *extra)


def environment_error(exc: BaseException) -> bool:
    """An OSError about a named path that the user fixes (permission, read-only, full disk, file in the way)."""
    return isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS and exc.filename is not None


def describe(exc: BaseException) -> str:
    """The one-message text of a user error: an environment OSError names its path and what to do."""
    if environment_error(exc):
        return f"cannot use {exc.filename}: {_ENVIRONMENT_ERRNOS[exc.errno]}"  # type: ignore[union-attr]
    return str(exc)


def report_user_error(log: logging.Logger, exc: BaseException) -> int:
    """Log `exc` as one error message (no traceback) and return the user-error exit code."""
    log.error("%s", describe(exc))
    return EXIT_USER_ERROR


def run_command(body: Callable[[], int], log: logging.Logger, *extra: type[BaseException]) -> int:
    """body() with the contract: a user error (the shared types, `extra`, an environment OSError) is one
    message and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        return body()
    except user_errors(*extra) as exc:
        return report_user_error(log, exc)
    except OSError as exc:
        if not environment_error(exc):
            raise
        return report_user_error(log, exc)


@contextmanager
def reading(what: str, path: str | Path) -> Iterator[None]:
    """Errors of a file reader (OSError, ValueError, UnicodeDecodeError: missing, a folder, damaged, the wrong
    format) become an InputError naming `what` (the option or key) and the file."""
    try:
        yield
    except (ConfigError, InputError, CheckpointError):
        raise
    except (OSError, ValueError) as exc:
        text = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        raise InputError(f"{what}: {text}") from None


def require_file(what: str, path: Path, hint: str = "") -> Path:
    """`path` must be an existing file: InputError naming `what` (missing, or a folder) otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{what}: {path} is a folder, not a file{'; ' + hint if hint else ''}")
    if not path.is_file():
        raise InputError(f"{what}: no such file {path}{'; ' + hint if hint else ''}")
    return path


def require_folder(what: str, path: Path, hint: str = "") -> Path:
    """`path` must be an existing folder: InputError naming `what` (missing, or a file) otherwise."""
    path = Path(path).expanduser()
    if path.is_file():
        raise InputError(f"{what}: {path} is a file, not a folder{'; ' + hint if hint else ''}")
    if not path.is_dir():
        raise InputError(f"{what}: no such folder {path}{'; ' + hint if hint else ''}")
    return path


def require_writable_folder(what: str, path: str | Path) -> Path:
    """`path` ('~' expanded) must be, or be creatable as, a folder this user can write: checked before any
    work starts, so that nothing is computed for an output that cannot be written."""
    given, path = str(path), Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {given!r} is a file, not a folder; choose another {what}")
    base = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not base.is_dir():
        raise InputError(f"{what} {given!r}: {base} is a file, so the folder cannot be created; "
                         f"choose another {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{what} {given!r} is not writable ({base} is read-only for this user); "
                         f"choose another {what}")
    return path
