"""The reproduce page's cost table comes from measured run directories (or_core.costs)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from or_core import costs
from or_core.run_dirs import load_run_dirs

REPO = Path(__file__).resolve().parents[1]
GPU_RUNS = REPO / "results" / "gpu_runs"


def test_each_measured_run_gives_its_first_and_median_epoch() -> None:
    measured = costs.measured_runs(load_run_dirs(GPU_RUNS))
    assert len(measured) >= 2
    for name, row in measured.iterrows():
        times = [json.loads(line)["epoch_time_s"] for line in (GPU_RUNS / name / "metrics.jsonl").read_text().splitlines()]
        assert row["first epoch (s)"] == times[0]
        assert row["later epochs, median (s)"] == statistics.median(times[1:])
    assert costs.measured_runs(load_run_dirs(GPU_RUNS), min_epochs=1000).empty


def test_a_matrix_costs_its_runs_times_the_measured_epochs(tmp_path: Path) -> None:
    measured = costs.measured_runs(load_run_dirs(GPU_RUNS))
    matrix = tmp_path / "m.yaml"
    matrix.write_text("name: m\nprofile: gpu\nresults: out\nruns:\n"
                      "  - {method: byol, dataset: cifar10, regularizer: [none, so]}\n"
                      "  - {method: simclr, dataset: cifar10, regularizer: none, epochs: 100}\n")
    table = costs.matrix_costs([matrix], measured)
    row = table.iloc[0]
    known = measured[measured["device"] == measured.loc[measured["device"] != "-", "device"].iloc[0]]
    first, later = known["first epoch (s)"].mean(), known["later epochs, median (s)"].mean()
    expected = (2 * (first + 199 * later) + (first + 99 * later)) / 60
    assert row["runs"] == 3 and row["epochs"] == "100, 200"
    assert row["GPU hours"] == pytest.approx(expected / 60)
    assert "simclr taken at the same rate" in row["basis"] and known["device"].iloc[0] in row["basis"]
    text = costs.costs_markdown(table)
    assert text.splitlines()[2].startswith("| `m.yaml` | 3 | 100, 200 |")
