"""Result records: the small JSON files under ``results/`` that every figure and table comes from.

A record is one run (or one measurement), never a checkpoint or data: its configuration, its
numbers, the collapse spectra of its final encoder (measured by
:func:`or_core.measure.collapse_spectra`), the scale it was made at and its provenance
(:func:`or_core.provenance.provenance`). This module only writes records (atomically,
:func:`write_record`) and reads them back (:func:`load_records`); the book re-plots them and
tests check claims against them. It imports nothing of the training code.

Scales, written into every record and onto every figure made from it:

* ``cpu``: the cpu profile (narrow ResNet-18, all of CIFAR, 7 epochs, minutes a run on two
  cores); not the paper's setup.
* ``cpu-small``: the earlier cpu profile, now ``cpu_small`` (a CIFAR subset, 5 epochs); not the
  paper's setup.
* ``cpu-ci``: the smaller runs the notebooks make in CI (a smoke scale: they show the pipeline,
  their numbers mean little).
* ``paper-scale``: the gpu profile, the recipe of the libraries the paper used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from or_core.atomic import write_json_atomic
from or_core.provenance import git_commit, provenance

__all__ = [
    "SCALES",
    "scale_of",
    "git_commit",
    "provenance",
    "write_record",
    "load_record",
    "load_records",
]

#: The scale each profile's records are made at.
SCALES: dict[str, str] = {"cpu": "cpu", "cpu_small": "cpu-small", "ci": "cpu-ci", "gpu": "paper-scale"}

#: Names that moved to :mod:`or_core.measure` (they measure a trained encoder), still found
#: here for the notebooks and scripts that import them from this module.
_MOVED_TO_MEASURE = ("collapse_spectra", "stage_names")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_MEASURE:  # imported on use: reading records needs no torch model code
        from or_core import measure

        return getattr(measure, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def scale_of(profile: str) -> str:
    """``cpu`` -> ``cpu``, ``cpu_small`` -> ``cpu-small``, ``ci`` -> ``cpu-ci``, ``gpu`` ->
    ``paper-scale``; else ``custom``."""
    return SCALES.get(profile, "custom")


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented JSON, atomically (:func:`or_core.atomic.write_atomic`)."""
    path = Path(path)
    write_json_atomic(path, record, indent=1)
    return path


def load_record(path: str | Path) -> dict[str, Any]:
    """One record; a file that is not a JSON object is an error naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid JSON record: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object")
    return record


def load_records(directory: str | Path, pattern: str = "*.json") -> list[dict[str, Any]]:
    """Every record matching ``pattern`` under ``directory`` (recursively), sorted by path, each
    with its path under the key ``"_path"``. A missing directory is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no results folder at {directory}")
    records = []
    for path in sorted(directory.rglob(pattern)):
        record = load_record(path)
        record["_path"] = str(path)
        records.append(record)
    return records
