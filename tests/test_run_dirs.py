"""Run directories read back (``or_core.run_dirs``), on the committed gpu runs of ``results/gpu_runs/``."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from or_core.plots import history_figure
from or_core.run_dirs import load_run_dirs, run_dirs_table

GPU_RUNS = Path(__file__).resolve().parents[1] / "results" / "gpu_runs"


def test_the_table_holds_each_runs_summary_and_history() -> None:
    runs = load_run_dirs(GPU_RUNS)
    assert {"byol_none_cifar10_30ep_h100", "byol_so_cifar10_30ep_h100", "byol_srip_cifar10_30ep_h100"} <= {r.name for r in runs}
    table = run_dirs_table(runs)
    for run in runs:
        row = table.loc[run.name]
        history = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        assert row["epochs"] == len(history) and row["of"] == run.config["epochs"]
        assert row["images/s"] == statistics.median(e["images_per_s"] for e in history[1:])
        assert row["probe effective rank"] == history[-1]["effective_rank"]
        summary_path = run.path / "summary.json"
        assert row["finished"] == summary_path.is_file()
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            assert (row["knn_top1"], row["linear_top1"], row["device"]) == (summary["knn_top1"], summary["linear_top1"], summary["device"])
        else:
            assert row["knn_top1"] != row["knn_top1"]  # NaN: the run was stopped before its evaluation


def test_the_figure_draws_each_runs_history() -> None:
    runs = [r for r in load_run_dirs(GPU_RUNS) if r.name.endswith("_30ep_h100")]
    fig = history_figure(runs, metrics=("effective_rank", "ssl_loss"), title="H100, 30 epochs")
    try:
        rank_axes, loss_axes = fig.axes[:2]
        for axes, key in ((rank_axes, "effective_rank"), (loss_axes, "ssl_loss")):
            drawn = {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}
            assert drawn == {r.label: [e[key] for e in r.history] for r in runs}
        assert {"BYOL, no OR", "BYOL + SO (1e-6)", "BYOL + SRIP (1e-3)"} == {r.label for r in runs}
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="unknown metric.*'loss'.*effective_rank"):
        history_figure(runs, metrics=("loss",))
    empty = history_figure([])
    try:
        assert [t.get_text() for ax in empty.axes for t in ax.texts] == ["no data yet", "no data yet"]
    finally:
        plt.close(empty)


def test_missing_folders_other_folders_and_corrupt_lines(tmp_path: Path) -> None:
    assert load_run_dirs(tmp_path / "absent") == []
    (tmp_path / "not_a_run").mkdir()
    shutil.copytree(GPU_RUNS / "byol_so_cifar10_30ep_h100", tmp_path / "run")
    assert [r.name for r in load_run_dirs(tmp_path)] == ["run"]
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 31, "ssl_loss":\n')
    with pytest.raises(ValueError, match=r"run/metrics.jsonl, line 31: not JSON"):
        load_run_dirs(tmp_path)
