"""Atomic files: a run killed at any moment resumes from its last complete epoch.

Every file a run or a cache writes goes through :func:`write_atomic`: a temporary file beside
the target (``.<name>.<random>.tmp``), fsync, rename over the target, fsync of the folder. A
crash leaves either the old file or the new one, never a torn one; the temporary file a killed
write leaves behind is removed by the next start of the same run.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from or_core.errors import DataError

__all__ = ["write_atomic", "write_text_atomic", "save_atomic", "load_checkpoint"]


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename it over
    ``path`` and fsync the folder.

    Raises:
        OSError: with ``filename`` set to ``path`` when the system gave none (a full disk seen
            while writing), so that the error names the file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_atomic` of ``text`` (UTF-8)."""
    write_atomic(path, lambda f: f.write(text.encode()))


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`write_atomic`.

    Serialized in memory first: torch's zip writer reports a full disk as a ``RuntimeError``
    ("unexpected pos"), a plain write as the ``OSError`` (ENOSPC) that names the problem.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` if there is none.

    Raises:
        DataError: the file exists but cannot be read (named in the message, with the fix).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise DataError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); delete it to start the run over"
        ) from error
