"""One trainer per run directory: a lock file that names the process training it.

Why: two processes resuming the same run directory (the same matrix command in a second
terminal, two ``--jobs`` commands over one group, ``pretrain`` typed twice with one ``--out``)
would each load the checkpoint, train the same epochs and overwrite each other's checkpoint,
metrics and record, and nothing would say so. The first process creates ``training.lock``, holding its
host and process id, with a hard link that fails if the file exists (atomic on a local file
system), and removes it when it is done; a second process finds it and stops with a one-line error
(:class:`RunInUseError`), or, in the matrix, skips that run. A lock left by a process that no
longer runs on this host (killed with ``SIGKILL``, a machine that rebooted) is taken over; one
from another host cannot be checked and is left to the user to remove.

Example::

    from or_core.run_lock import run_lock

    with run_lock(out):        # raises RunInUseError if another live process holds out
        ...                    # train, evaluate, write the record
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from or_core.errors import ConfigError, InputError

__all__ = ["LOCK_FILE", "RunInUseError", "lock_holder", "run_lock"]

#: The lock's file name inside a run directory.
LOCK_FILE = "training.lock"


class RunInUseError(InputError, RuntimeError):
    """Another live process is training the run directory."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def lock_holder(out: str | Path) -> dict[str, Any] | None:
    """The live holder of ``out``'s lock (``{"host", "pid"}``), or ``None`` when there is no
    lock, or its process is gone from this host (a stale lock), or it is this process. A lock
    of another host counts as live: its process cannot be checked from here."""
    try:
        holder = json.loads((Path(out) / LOCK_FILE).read_text())
        host, pid = str(holder["host"]), int(holder["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable (locks are written whole, see _create): not a lock of ours
    if host != socket.gethostname():
        return {"host": host, "pid": pid}
    if pid == os.getpid() or not _alive(pid):
        return None
    return {"host": host, "pid": pid}


def _in_use(out: Path, holder: dict[str, Any]) -> RunInUseError:
    return RunInUseError(
        f"{out} is being trained by process {holder['pid']} on {holder['host']}: wait for it to end (the same "
        f"command then resumes or returns its result), or, if that process is gone, delete {out / LOCK_FILE}",
        holder,
    )


def _create(path: Path, me: dict[str, Any]) -> bool:
    """Create the lock at ``path`` holding ``me``, whole or not at all: the content is written
    to a file of this process first, then hard-linked to ``path`` (atomic, and it fails if
    ``path`` exists), so no other process ever reads a half-written lock. ``False``: it exists."""
    draft = path.with_name(f".{path.name}.{me['pid']}.new")
    draft.write_text(json.dumps(me))
    try:
        os.link(draft, path)
    except FileExistsError:
        return False
    finally:
        draft.unlink(missing_ok=True)
    return True


@contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold ``out``'s lock for the ``with`` block (``out`` is created if needed).

    Re-entrant within one process: a block inside another of the same process holds nothing
    more and releases nothing. A stale lock (see :func:`lock_holder`) is replaced.

    Raises:
        RunInUseError: another live process holds the lock.
        ConfigError: ``out``, or a folder above it, is a file.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{out} (or a folder above it) is a file: give the run a folder (--out)") from None
    path = out / LOCK_FILE
    me = _me()
    for _ in range(3):  # a stale lock is removed, then the create is tried again
        if _create(path, me):
            try:
                yield
            finally:
                path.unlink(missing_ok=True)
            return
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
        if current == me:
            yield  # this process holds it already (a nested block)
            return
        holder = lock_holder(out)
        if holder is not None:
            raise _in_use(out, holder)
        path.unlink(missing_ok=True)  # stale: its process is gone
    raise _in_use(out, lock_holder(out) or {"host": "?", "pid": "?"})
