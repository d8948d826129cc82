"""Atomic files: every file the package writes (checkpoints, records, run files, caches).

One writer, :func:`write_atomic`: a temporary file beside the target (``.<name>.<random>.tmp``),
fsync, rename over the target, fsync of the folder. A crash leaves either the old file or the
new one, never a torn one; the temporary file a killed write leaves behind is removed by the
next start of the same run (:func:`or_core.run_files.remove_partial_writes`). The file's mode
follows the umask, as a plain ``open`` would give it, and an ``OSError`` names the target, so
that the command line reports a full or read-only disk as one line
(:func:`or_core.errors.disk_error`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomic", "write_bytes_atomic", "write_text_atomic", "write_json_atomic"]


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


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> None:
    """:func:`write_atomic` of ``data``."""
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_atomic` of ``text`` (UTF-8)."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> None:
    """:func:`write_atomic` of ``obj`` as indented JSON and a final newline (``NaN`` and
    infinities written as JavaScript's ``NaN``/``Infinity``, as :mod:`json` does)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=True) + "\n")
