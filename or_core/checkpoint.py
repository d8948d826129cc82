"""Checkpoints: saved atomically, so that a run killed at any moment resumes from its last
complete epoch, and read back with an error that names an unreadable file or a missing one.

The bytes go through the package's one writer, :func:`or_core.atomic.write_atomic`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from or_core.atomic import write_bytes_atomic
from or_core.errors import DataError, MissingPathError
from or_core.run_files import CHECKPOINT_FILE, saved_config

__all__ = ["save_atomic", "load_checkpoint", "load_run_checkpoint"]


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


def load_run_checkpoint(run_dir: str | Path, purpose: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, config)`` of the last checkpoint of the run in ``run_dir``: the checkpoint and
    the config the run was trained with (:func:`or_core.run_files.saved_config`).

    Raises:
        MissingPathError: ``run_dir`` or its checkpoint does not exist; ``purpose`` (e.g.
            ``"evaluate"``) says what the checkpoint was wanted for.
    """
    out = Path(run_dir)
    if not out.is_dir():
        raise MissingPathError(f"run directory not found: {out}")
    state = load_checkpoint(out / CHECKPOINT_FILE)
    if state is None:
        wanted = f" to {purpose}" if purpose else ""
        raise MissingPathError(
            f"{out} has no {CHECKPOINT_FILE}{wanted}: train it first (python -m or_core pretrain --out {out})"
        )
    return state, saved_config(out, state)
