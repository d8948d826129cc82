"""GPU campaigns (:mod:`or_core.campaign`) at ci scale on the CPU: the command trains what fits
its budget into one bundle per run, skips what is recorded, never starts what cannot finish,
stops a run the estimate got wrong at the budget, and refuses a bad file in one line.

The runs are tiny (width 0.125, 256 real CIFAR-10 training images, one epoch, small evaluation
sizes), so the whole file takes tens of seconds on two cores.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli_helpers import run_cli as cli
from or_core.__main__ import main
from or_core.campaign import NEVER_FITS, NOT_STARTED, decide, expected_seconds, load_campaign, read_rates
from or_core.config import resolve_config

REPO = Path(__file__).resolve().parents[1]
RUN = "byol-cifar10-so-1e-6-s0"


@pytest.fixture
def base(cifar10_dir: Path) -> dict[str, Any]:
    """The ci scale cut further: seconds per run on two cores."""
    return {
        "dataset": "cifar10", "data_root": str(cifar10_dir.parent), "width": 0.125, "subset": 256, "epochs": 1,
        "batch_size": 64, "eval_train_subset": 256, "eval_test_subset": 200, "val_images": 0, "linear_epochs": 2,
        "knn_k": 20, "method_kwargs": {"proj_hidden_dim": 64, "proj_output_dim": 32},
    }


@pytest.fixture
def work_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder the runs' directories are made in, to check that they are deleted."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def write_campaign(path: Path, base: dict[str, Any], runs: list[Any], **top: Any) -> Path:
    spec = {
        "name": "tiny", "profile": "ci", "results": str(path.parent / "results"), "base": base,
        "rates": {"byol": {"any": 100}}, "allowance_s": {"startup": 5, "compile": 0, "evaluation": 10}, "margin": 1.0,
        "runs": runs, **top,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def numbers(value: Any) -> list[float]:
    """Every number in a JSON value."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [x for item in items for x in numbers(item)]


def test_estimate_and_decision() -> None:
    cfg = resolve_config("gpu", overrides={"epochs": 100})  # compiled: the compile allowance counts
    allowance = {"startup": 20.0, "compile": 40.0, "evaluation": 40.0}
    # 100 epochs x 195 full batches of 256 at 17,886 images/s, x 1.1, + 100 s
    assert expected_seconds(cfg, 50_000, 17_886, allowance, 1.1) == pytest.approx(100 + 1.1 * 4_992_000 / 17_886)
    eager = resolve_config("ci", overrides={"epochs": 2, "batch_size": 100})
    assert expected_seconds(eager, 250, 50, allowance, 1.0) == pytest.approx(60 + 2 * 200 / 50)
    assert decide(100, remaining_s=150, available_s=470) is None
    assert decide(200, remaining_s=150, available_s=470) == NOT_STARTED  # a later call runs it
    assert decide(500, remaining_s=480, available_s=470) == NEVER_FITS  # no call of this budget does


def test_campaign_trains_what_fits_records_it_and_skips_it_next_time(
    base: dict[str, Any], tmp_path: Path, work_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write_campaign(tmp_path / "tiny.yaml", base, [
        {"priority": "P1", "method": "byol", "regularizer": "so", "gamma": 1e-6},
        # 1000 epochs at 100 images/s: 2,575 s expected, more than any call of a 300 s budget has
        {"priority": "P2", "name": "too-long", "method": "byol", "regularizer": "none", "epochs": 1000},
    ])
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, "campaign", path, "--budget-s", 300, "--out", out)
    assert code == 0, stderr
    assert [p.name for p in out.iterdir()] == [f"{RUN}.json"]  # one bundle, nothing of too-long
    assert list(work_tmp.iterdir()) == []  # the run directory (checkpoint and all) is gone
    assert f"done {RUN}" in stdout and "skip too-long: expected 2575 s" in stdout
    assert "ran: " + RUN in stdout and "never fits (1): too-long" in stdout and "budget left: " in stdout

    bundle = json.loads((out / f"{RUN}.json").read_text())
    assert {"name", "matrix", "groups", "scale", "config", "summary", "history", "collapse", "provenance", "campaign"} <= set(bundle)
    assert bundle["name"] == RUN and bundle["groups"] == ["P1"] and bundle["scale"] == "cpu-ci"
    assert bundle["config"]["regularizer"] == "so" and bundle["config"]["gamma"] == 1e-6
    assert [h["epoch"] for h in bundle["history"]] == [1]
    assert 0 <= bundle["summary"]["knn_top1"] <= 1 and 0 <= bundle["summary"]["linear_top1"] <= 1
    collapse = bundle["collapse"]
    assert collapse["images"] == 200 and set(collapse["hidden"]) == {"layer1", "layer2", "layer3", "layer4"}
    assert len(collapse["weights"]) == 20 and len(collapse["representation"]) == 64  # width 0.125: 512 / 8
    for part in ("summary", "history", "collapse", "campaign"):
        assert all(math.isfinite(x) for x in numbers(bundle[part])), part
    prov = bundle["provenance"]
    assert prov["device"].startswith("cpu: ") and prov["gpu_minutes"] is None
    assert prov["record_wall_time_s"] > 0 and "campaign" in prov["command"] and prov["git_commit"]
    measured = bundle["campaign"]["measured"]
    assert bundle["campaign"]["expected_s"] == pytest.approx(15 + 256 / 100, abs=0.1)
    assert measured["wall_s"] >= measured["training_s"] > 0 and measured["images_per_s_after_first_epoch"] > 0

    # The report reads a bundle as it reads a matrix record.
    report = pytest.importorskip("or_core.report")
    (row,) = report.records_frame([bundle]).to_dict("records")
    assert row["name"] == RUN and row["regularizer"] == "so" and row["scale"] == "cpu-ci"

    # Committed into the results folder, the run is skipped; nothing is trained or written.
    (tmp_path / "results").mkdir()
    shutil.copy(out / f"{RUN}.json", tmp_path / "results")
    again = tmp_path / "again"
    code, stdout, stderr = cli(capsys, "campaign", path, "--budget-s", 300, "--out", again)
    assert code == 0, stderr
    assert list(again.iterdir()) == [] and "ran: nothing" in stdout and f"recorded (1): {RUN}" in stdout

    # The bundle's measured rate replaces the file's (a folder of records given to --rates).
    rates = read_rates(tmp_path / "results")
    assert rates[("byol", "so", "none")][0] == pytest.approx(measured["images_per_s_after_first_epoch"], abs=0.1)
    (run, _) = load_campaign(path, measured=rates).runs
    assert run.rate_source == f"{RUN}.json, measured" and run.rate == rates[("byol", "so", "none")][0]


def test_a_run_still_training_when_the_budget_is_spent_is_stopped_and_leaves_nothing(
    base: dict[str, Any], tmp_path: Path, work_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    # An estimate far too low (a billion images/s, no allowances): 200 epochs "fit" 8 seconds.
    path = write_campaign(
        tmp_path / "wrong.yaml", base, [{"method": "byol", "epochs": 200}],
        rates={"byol": {"any": 1e9}}, allowance_s={"startup": 0, "compile": 0, "evaluation": 0},
    )
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, "campaign", path, "--budget-s", 8, "--out", out)
    assert code == 2 and stderr.count("\n") == 1 and "ran past the budget" in stderr, stderr
    assert "aborted byol-cifar10-none-s0" in stdout and "budget left: " in stdout
    assert list(out.iterdir()) == [] and list(work_tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("runs", "top", "phrases"),
    [
        ([{"method": "byol"}, {"method": "byoll"}], {}, ["run entry 2", "unknown method 'byoll'"]),
        ([{"method": "simclr"}], {}, ["run entry 1 (simclr-cifar10-none-s0)", "no rate for simclr + none"]),
        ([{"method": "byol", "epochs": 1.5}], {}, ["run entry 1", "'epochs' must be an integer"]),
        ([{"method": "byol"}, {"method": "byol"}], {}, ["run entry 2 (byol-cifar10-none-s0)", "also run entry 1"]),
        ([{"method": "byol"}], {"margin": 0.5}, ["`margin:` must be a number >= 1"]),
        ([{"method": "byol", "seed": [0, 1], "name": "x"}], {}, ["run entry 1", "'name' names one run"]),
    ],
)
def test_a_bad_campaign_file_is_one_line_and_exit_code_2(
    base: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, runs: list, top: dict, phrases: list[str]
) -> None:
    path = write_campaign(tmp_path / "bad.yaml", base, runs, **top)
    code, _, stderr = cli(capsys, "campaign", path, "--budget-s", 300, "--out", tmp_path / "out")
    lines = stderr.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # validated before anything is made


def test_the_gpu_campaign_file_is_valid_and_in_priority_order(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    campaign = load_campaign(REPO / "configs" / "campaign_gpu.yaml")
    priorities = [r.priority for r in campaign.runs]
    assert priorities == sorted(priorities) and priorities[:4] == ["P1"] * 4 and len(campaign.runs) == 21
    first = campaign.runs[0]
    assert first.name == "byol-cifar10-none-s0" and first.cfg.epochs == 100 and first.cfg.width == 1.0
    assert first.cfg.batch_size == 256 and first.cfg.subset is None and first.cfg.eval_test_subset is None
    assert first.cfg.compile == "reduce-overhead" and campaign.scale == "gpu-100ep"
    assert campaign.results == REPO / "results" / "campaign_gpu"
    gammas = {r.cfg.regularizer: r.cfg.gamma for r in campaign.runs if r.cfg.regularizer != "none"}
    assert gammas == {"so": 1e-6, "srip": 1e-3, "so_diag": 1e-6, "so_offdiag": 1e-6}
    code, stdout, _ = cli(capsys, "campaign", REPO / "configs" / "campaign_gpu.yaml", "--budget-s", 480,
                          "--out", tmp_path / "out", "--results", tmp_path / "none", "--dry-run")
    assert code == 0 and "would run: byol-cifar10-none-s0\n" in stdout and not (tmp_path / "out").exists()


def test_concurrency_benchmark_runs_a_tiny_cpu_version(cifar10_dir: Path, tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "concurrency.py"
    out = tmp_path / "concurrency.json"
    proc = subprocess.run(
        [sys.executable, script, "--device", "cpu", "--counts", "2", "--steps", "1", "--warmup", "1",
         "--data-root", cifar10_dir.parent, "--json", out],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    (row,) = payload["results"]
    assert row["processes"] == 2 and len(row["per_process_images_per_s"]) == 2 and row["total_images_per_s"] > 0
    assert payload["provenance"]["git_commit"] and payload["device"].startswith("cpu")
