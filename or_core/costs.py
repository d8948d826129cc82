"""What paper-scale runs cost, from measured run directories rather than published timings.

The book's *Reproducing at paper scale* page shows its cost table from here: each measured run
directory (``results/gpu_runs/``: the gpu profile cut to a few epochs on one GPU) gives the
seconds of its first epoch (compilation included) and the median of the later ones, and so the
minutes a full run of its planned epochs takes on that GPU; a matrix file's runs times those
minutes gives its GPU hours. Evaluation (kNN and linear probe) is not in the epochs and is not
counted.

Example::

    from or_core import costs, run_dirs

    measured = costs.measured_runs(run_dirs.load_run_dirs("results/gpu_runs"))
    costs.matrix_costs(["configs/matrix_gpu.yaml", "configs/matrix_paper.yaml"], measured)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from or_core.matrix import load_matrix
from or_core.run_dirs import RunDir

__all__ = ["MIN_EPOCHS", "measured_runs", "matrix_costs", "costs_markdown"]

#: Runs with fewer epochs than this measure compilation more than training and are left out.
MIN_EPOCHS = 10


def measured_runs(runs: Sequence[RunDir], min_epochs: int = MIN_EPOCHS) -> pd.DataFrame:
    """One row per run directory with at least ``min_epochs`` epochs recorded: its device,
    method, regularizer, data set, epochs recorded, the first epoch's seconds (compilation
    included) and the median of the later epochs' seconds."""
    rows = []
    for run in runs:
        times = [e["epoch_time_s"] for e in run.history if "epoch_time_s" in e]
        if len(times) < min_epochs:
            continue
        rows.append({
            "run": run.name, "device": (run.summary or {}).get("device", "-"), "method": run.config.get("method"),
            "regularizer": run.config.get("regularizer", "none"), "dataset": Path(str(run.config.get("dataset"))).name,
            "epochs recorded": len(times), "first epoch (s)": times[0],
            "later epochs, median (s)": statistics.median(times[1:]),
        })
    columns = ["run", "device", "method", "regularizer", "dataset", "epochs recorded", "first epoch (s)",
               "later epochs, median (s)"]
    return pd.DataFrame(rows, columns=columns).set_index("run")


def matrix_costs(matrices: Sequence[str | Path], measured: pd.DataFrame) -> pd.DataFrame:
    """GPU hours of each matrix file at the measured rate: for each of its runs, the first
    epoch plus (epochs - 1) later epochs at the mean of the measured runs on one device (the
    first with a known device), its epochs those of the run (the matrix's profile unless the
    run sets them); the basis of the estimate in words. Runs of other methods than the
    measured ones are costed at their rate all the same, and the basis says so (their
    throughput: ``results/benchmarks/``)."""
    from or_core.config import PROFILES, PretrainConfig

    columns = ["matrix", "runs", "epochs", "minutes per run", "GPU hours", "basis"]
    known = measured[measured["device"] != "-"]
    if known.empty:
        return pd.DataFrame(columns=columns)
    device = known["device"].iloc[0]
    same = known[known["device"] == device]
    first, later = float(same["first epoch (s)"].mean()), float(same["later epochs, median (s)"].mean())
    methods = sorted(set(same["method"]))
    rows = []
    for path in matrices:
        matrix = load_matrix(path)
        default = PROFILES.get(matrix.profile, {}).get("epochs", PretrainConfig.epochs)
        epochs = [int(e.overrides.get("epochs") or default) for e in matrix.experiments]
        minutes = [(first + (n - 1) * later) / 60 for n in epochs]
        others = sorted({str(e.overrides.get("method")) for e in matrix.experiments} - set(methods))
        basis = (f"{len(same)} measured {', '.join(methods)} runs on one {device}: {later:.2f} s per epoch "
                 f"after a first of {first:.0f} s"
                 + (f"; {', '.join(others)} taken at the same rate" if others else ""))
        rows.append({"matrix": Path(path).name, "runs": len(epochs),
                     "epochs": ", ".join(str(n) for n in sorted(set(epochs))),
                     "minutes per run": sum(minutes) / len(minutes), "GPU hours": sum(minutes) / 60, "basis": basis})
    return pd.DataFrame(rows, columns=columns)


def costs_markdown(table: pd.DataFrame) -> str:
    """:func:`matrix_costs` as a Markdown table (minutes and hours rounded to what a plan needs)."""
    lines = ["| matrix | runs | epochs | minutes per run | GPU hours | basis |", "|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        lines.append(f"| `{row['matrix']}` | {row['runs']} | {row['epochs']} | {row['minutes per run']:.0f} | "
                     f"{row['GPU hours']:.1f} | {row['basis']} |")
    return "\n".join(lines)
