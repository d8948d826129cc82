"""The files of a run directory, written and read back.

``python -m or_core pretrain --out DIR`` (:func:`or_core.train.pretrain`) leaves in ``DIR``:

* ``config.yaml``: the run's configuration (:func:`prepare_run_dir`);
* ``metrics.jsonl``: one JSON line per finished epoch (:func:`write_metrics`, :func:`read_metrics`);
* ``checkpoint.pt``: the state of the last finished epoch (:mod:`or_core.checkpoint`);
* ``summary.json``: the final evaluation, once it has run (:func:`write_summary`,
  :func:`read_summary`).

Every write is atomic (:mod:`or_core.atomic`). Reading needs neither torch nor the training
code, so that tables and figures of run directories (:mod:`or_core.run_dirs`) load fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from or_core.atomic import write_text_atomic
from or_core.errors import InputError, MissingPathError

if TYPE_CHECKING:
    from or_core.config import PretrainConfig

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "CHECKPOINT_FILE",
    "SUMMARY_FILE",
    "RunConfigMismatchError",
    "prepare_run_dir",
    "remove_partial_writes",
    "write_metrics",
    "read_metrics",
    "write_summary",
    "read_summary",
    "saved_config",
]

CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoint.pt",
    "summary.json",
)


class RunConfigMismatchError(InputError, ValueError):
    """``--out`` already holds a checkpoint made with a different configuration."""


def prepare_run_dir(cfg: PretrainConfig, out: Path, state: dict[str, Any] | None, write: bool = True) -> None:
    """Check that the checkpoint in ``out`` (if any) was made with ``cfg``, then write
    ``config.yaml`` (atomically; ranks other than 0 pass ``write=False``).

    The checkpoint's own config is the reference, not ``config.yaml``: a directory whose
    ``config.yaml`` is missing cannot mix two configurations, and a first attempt that failed
    before its first epoch (no checkpoint) does not block the corrected command.
    """
    if state is not None:
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise RunConfigMismatchError(
                f"{out / CHECKPOINT_FILE} holds no config (written by an older version?): "
                f"use another --out, or delete {out} to start over"
            )
        current = cfg.to_dict()
        # a field added after the checkpoint was written holds its default there
        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
        saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
        differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differing:
            shown = "; ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differing[:4])
            raise RunConfigMismatchError(
                f"{out} holds a checkpoint of a different configuration ({shown}): use another "
                f"--out, or delete {out} to start over"
            )
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def saved_config(out: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The config a run directory was trained with: its checkpoint's own (``state``), else
    ``config.yaml`` (for checkpoints without one)."""
    saved = state.get("config")
    if saved is None and (out / CONFIG_FILE).is_file():
        saved = yaml.safe_load((out / CONFIG_FILE).read_text())
    if saved is None:
        raise MissingPathError(f"{out} holds neither a checkpoint config nor {CONFIG_FILE}")
    return saved


def remove_partial_writes(out: Path) -> None:
    """Delete the temporary files (``.<name>.*tmp``) a killed write left in the run directory."""
    for tmp in out.glob(".*tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the history held in the checkpoint (atomic)."""
    write_text_atomic(out / METRICS_FILE, "".join(json.dumps(line) + "\n" for line in history))


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The per-epoch history in ``out/metrics.jsonl``, one dict per epoch; a line that is not
    JSON is a ``ValueError`` naming the file and the line."""
    path = Path(out) / METRICS_FILE
    history = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
    return history


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (atomic)."""
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def read_summary(out: str | Path) -> dict[str, Any] | None:
    """``out/summary.json``, or ``None`` while the run's final evaluation has not run."""
    path = Path(out) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None
