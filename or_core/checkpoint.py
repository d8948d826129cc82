"""Checkpoints: saved atomically, so that a run killed at any moment resumes from its last
complete epoch, and read back with an error that names an unreadable file.

The bytes go through the package's one writer, :func:`or_core.atomic.write_atomic`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from or_core.atomic import write_bytes_atomic
from or_core.errors import DataError

__all__ = ["save_atomic", "load_checkpoint"]


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`or_core.atomic.write_atomic`.

    Serialized in memory first: torch's zip writer reports a full disk as a ``RuntimeError``
    ("unexpected pos"), a plain write as the ``OSError`` (ENOSPC) that names the problem.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


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
