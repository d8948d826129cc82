"""Run directories read back: the per-epoch history and the summary of single pretraining runs.

``python -m or_core pretrain --out DIR`` leaves ``config.yaml``, ``metrics.jsonl`` (one line
per epoch) and, once the final evaluation has run, ``summary.json`` in ``DIR``
(:mod:`or_core.run_files`). The matrices' records (:mod:`or_core.records`) are the book's main
evidence; this module shows the runs made outside a matrix, such as the short gpu-profile runs
under ``results/gpu_runs/``, without retraining anything:

* :func:`load_run_dirs`: every run directory under a folder, finished or not;
* :func:`run_dirs_table`: one row per run (its setting, throughput, final accuracy);
* :func:`or_core.plots.history_figure` draws their per-epoch curves (effective rank of the
  fixed probe batch, SSL loss, ...), one panel per metric.

Example (from the repository root)::

    from or_core import plots, run_dirs

    runs = run_dirs.load_run_dirs("results/gpu_runs")
    run_dirs.run_dirs_table(runs)
    fig = plots.history_figure(runs)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from or_core.config import load_yaml
from or_core.fast_path.compiled_calls import compile_mode
from or_core.run_files import CONFIG_FILE, METRICS_FILE, read_metrics, read_summary

__all__ = ["RunDir", "load_run_dirs", "run_dirs_table", "HISTORY_LABELS"]

#: Per-epoch keys of ``metrics.jsonl`` that :func:`or_core.plots.history_figure` can draw, with
#: axis labels.
HISTORY_LABELS = {
    "effective_rank": "effective rank (fixed probe batch)",
    "std_of_l2_normalized": "std of the l2-normalized representation",
    "ssl_loss": "SSL loss",
    "or_term": "OR term (gamma x penalty)",
    "images_per_s": "images/s",
}


@dataclass(frozen=True)
class RunDir:
    """One run directory: its name, configuration, per-epoch history and summary (``None``
    while the final evaluation has not run, e.g. for a run stopped during it)."""

    name: str
    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        """Whether ``summary.json`` exists: the run trained and was evaluated."""
        return self.summary is not None

    @property
    def label(self) -> str:
        """``BYOL + SO (1e-6)``: method (as the book writes it), regularizer and gamma, for legends."""
        from or_core.report import method_label  # report reads records only; imported late to stay light

        method, regularizer = method_label(self.config.get("method", "?")), self.config.get("regularizer", "none")
        if regularizer == "none":
            return f"{method}, no OR"
        gamma = self.config.get("gamma")
        return f"{method} + {regularizer.upper()}" + (f" ({gamma:.0e})".replace("e-0", "e-") if gamma else "")


def load_run_dirs(folder: str | Path) -> list[RunDir]:
    """Every run directory directly under ``folder`` (a subfolder with ``config.yaml`` and
    ``metrics.jsonl``), sorted by name. A folder that does not exist gives ``[]``; other
    subfolders are skipped."""
    root = Path(folder)
    if not root.is_dir():
        return []
    runs = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        if not ((path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()):
            continue
        runs.append(RunDir(
            name=path.name,
            path=path,
            config=load_yaml(path / CONFIG_FILE),
            history=read_metrics(path),
            summary=read_summary(path),
        ))
    return runs


def run_dirs_table(runs: Sequence[RunDir]) -> pd.DataFrame:
    """One row per run: method, regularizer, gamma, data set, epochs trained of those planned,
    the device, the compile mode, the median images/s of the epochs after the first (the first
    includes any compilation), the probe batch's effective rank at the last epoch, and the final
    summary's kNN and linear top-1 and test-set effective rank (``NaN`` for an unfinished run)."""
    columns = ["run", "method", "regularizer", "gamma", "dataset", "epochs", "of", "device", "compile", "images/s",
               "probe effective rank", "knn_top1", "linear_top1", "effective_rank", "finished"]
    rows = []
    for run in runs:
        summary = run.summary or {}
        later = [e["images_per_s"] for e in run.history[1:] if "images_per_s" in e]
        rows.append({
            "run": run.name,
            "method": run.config.get("method"),
            "regularizer": run.config.get("regularizer"),
            "gamma": run.config.get("gamma"),
            "dataset": Path(str(run.config.get("dataset"))).name,
            "epochs": len(run.history),
            "of": run.config.get("epochs"),
            "device": summary.get("device", "-"),
            "compile": compile_mode(run.config.get("compile")) or "no",
            "images/s": statistics.median(later) if later else float("nan"),
            "probe effective rank": (run.history[-1].get("effective_rank", float("nan")) if run.history
                                     else float("nan")),
            "knn_top1": summary.get("knn_top1", float("nan")),
            "linear_top1": summary.get("linear_top1", float("nan")),
            "effective_rank": summary.get("effective_rank", float("nan")),
            "finished": run.finished,
        })
    return pd.DataFrame(rows, columns=columns).set_index("run")
