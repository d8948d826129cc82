"""A matrix validates every run before it runs any, and one failed run never stops the others
(issue 15): bad entries are named by number and file, failures are listed at the end and the
command line exits with code 2, one line per problem, no traceback for input errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from or_core import experiments
from or_core.__main__ import main
from or_core.errors import ConfigError, MissingPathError
from or_core.experiments import MatrixRunsFailed, load_matrix, run_matrix

REPO = Path(__file__).resolve().parents[1]

GRIDS = {"so": [1e-5, 1e-6]}
CHOOSE = {"method": "byol", "dataset": "cifar10", "grids": GRIDS}
#: A run of seconds on the real CIFAR-10 (on top of the ci profile).
TINY = {
    "width": 0.125, "subset": 64, "epochs": 1, "batch_size": 32, "eval_train_subset": 50, "eval_test_subset": 50,
    "val_images": 0, "linear_epochs": 1, "knn_k": 5, "method_kwargs": {"proj_hidden_dim": 32, "proj_output_dim": 16},
}


def _write(path: Path, spec: Any) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False) if not isinstance(spec, str) else spec)
    return path


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line]


def test_dry_run_names_every_bad_entry_by_its_number_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "m.yaml", {
        "profile": "ci", "results": str(tmp_path / "results"), "choose_gamma": CHOOSE,
        "runs": [
            {"group": "grid", "method": "byol", "regularizer": "so", "gamma": [1e-5, 1e-6]},  # 1: fine
            {"method": "byol", "epochs": 1.7},                                              # 2
            "byol",                                                                         # 3
            {"method": ["simclr", "byl"], "lerning_rate": 1},                               # 4
            {"method": ["simclr", "byl"]},                                                  # 5
            {"method": "byol", "regularizer": "srip", "gamma": "chosen"},                   # 6: no srip grid
            {"method": "byol", "regularizer": "so", "gamma": "chosen", "seed": 1},          # 7: fine
            {"method": "byol", "regularizer": "none", "batch_size": [1, 2], "stream": "false"},  # 8
        ],
    })
    with pytest.raises(ConfigError) as raised:
        run_matrix(path, tmp_path / "work", dry_run=True)
    message = str(raised.value)
    assert message.startswith(f"{path} (run entries counted from 1): run entry 2: field 'epochs' must be an integer >= 1, got 1.7; ")
    assert re.findall(r"run entry (\d+)", message) == ["2", "3", "4", "5", "6", "8"]
    assert "run entry 3: expected a mapping of fields such as {method: byol, regularizer: so}, got the text 'byol'" in message
    assert "run entry 4: unknown fields ['lerning_rate']" in message
    assert "run entry 5: unknown method 'byl'; valid methods: " in message
    assert "run entry 6: gamma: chosen needs a grid for regularizer 'srip' in choose_gamma.grids (it has so)" in message
    assert "run entry 8: field 'stream' must be true or false (unquoted), got 'false'" in message
    assert "\n" not in message

    # the command line: one line, exit code 2; a real run checks all of it before training any
    monkeypatch.setattr(experiments, "run_experiment", lambda *a, **k: pytest.fail("a run started"))
    for flags in (["--dry-run"], []):
        assert main(["matrix", str(path), "--work", str(tmp_path / "work"), *flags]) == 2
        assert _error_lines(capsys) == [f"error: {message}"]


def test_chosen_gamma_needs_its_grid_among_the_runs(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.yaml", {"profile": "ci", "choose_gamma": CHOOSE, "runs": [
        {"method": "byol", "regularizer": "so", "gamma": 1e-5},
        {"method": "simclr", "regularizer": "so", "gamma": "chosen"},
    ]})
    with pytest.raises(ConfigError, match=re.escape(
        "choose_gamma: gamma: chosen for so needs the grid's runs (byol on cifar10, seed 0) with gamma [1e-06]; add them"
    )):
        load_matrix(path)


@pytest.mark.parametrize(("spec", "expected"), [
    ({"runs": {"a": {"method": "byol"}}}, "`runs:` must be a list of entries, each a `- ` item such as "
     "`- {method: byol, regularizer: so}`, got a mapping; put a `- ` before each entry"),
    ([{"method": "byol"}], "expected a mapping of name, profile, results, base, choose_gamma, runs at the top level, "
     "got a list; see configs/matrix_cpu.yaml"),
    ({"profile": "ci", "runs": []}, "no runs; add a `runs:` list"),
    ("runs:\n  - {method: byol\n", ", line 3: not valid YAML (expected ',' or '}', but got '<stream end>'); fix the file"),
    ({"profile": "cii", "base": {"epochs": 0}, "runs": [{"seed": -1}]}, " (run entries counted from 1): unknown profile "
     "'cii'; valid profiles: cpu, cpu_small, ci, gpu; base: field 'epochs' must be an integer >= 1, got 0; run entry 1: field "
     "'seed' must be an integer >= 0, got -1"),
], ids=["runs-mapping", "top-list", "no-runs", "bad-yaml", "profile-and-base"])
def test_a_matrix_file_of_the_wrong_shape_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: Any, expected: str
) -> None:
    path = _write(tmp_path / "m.yaml", spec)
    with pytest.raises(ConfigError):
        load_matrix(path)
    assert main(["matrix", str(path), "--dry-run"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(f"error: {path}") and expected in line


def test_a_missing_matrix_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MissingPathError):
        load_matrix(tmp_path / "nope.yaml")
    assert main(["matrix", str(tmp_path / "nope.yaml")]) == 2
    assert _error_lines(capsys) == [
        f"error: matrix file not found: {tmp_path / 'nope.yaml'}; check the path (the matrices are configs/matrix_*.yaml)"
    ]


def test_a_failed_run_leaves_the_others_to_run_and_is_listed_at_the_end(
    cifar10_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--jobs 1`` on the real CIFAR-10: the grid's run points at a folder that does not
    exist; the run after it still trains and is recorded, the chosen run says why it did not
    run, and the command ends with the list and exit code 2."""
    missing = tmp_path / "nowhere" / "cifar10"
    path = _write(tmp_path / "m.yaml", {
        "profile": "ci", "results": str(tmp_path / "results"), "base": {**TINY, "data_root": str(cifar10_dir.parent)},
        "choose_gamma": {**CHOOSE, "grids": {"so": [1e-6]}},
        "runs": [
            {"group": "grid", "dataset": str(missing), "regularizer": "so", "gamma": 1e-6},
            {"group": "grid", "regularizer": "none"},
            {"group": "pair", "regularizer": "so", "gamma": "chosen", "seed": 1},
        ],
    })
    assert main(["matrix", str(path), "--work", str(tmp_path / "work")]) == 2
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["byol-cifar10-none-s0.json"]
    lines = _error_lines(capsys)
    grid_error = (f"unknown data set '{missing}': use one of cifar10, cifar100, or the path of an ImageFolder root "
                  f"with train/ and val/ or test/ (no such folder: {missing})")
    final = [
        f"[matrix] failed: byol-cifar10-so-1e-6-s0: {grid_error}",
        "[matrix] failed: byol-cifar10-so-chosen-s1: not run: its gamma cannot be chosen, as so grid run(s) "
        "byol-cifar10-so-1e-6-s0 failed",
        "error: 2 of 3 matrix runs failed (byol-cifar10-so-1e-6-s0, byol-cifar10-so-chosen-s1), each listed above "
        "with its error; the others are recorded; fix the errors and re-run the same command to resume (recorded "
        "runs are skipped)",
    ]
    assert lines[-3:] == final
    assert lines.count(final[0]) == lines.count(final[1]) == 2  # said when it happened, and again at the end


def test_a_bug_in_one_run_is_listed_with_its_type_and_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "m.yaml", {"profile": "ci", "results": str(tmp_path / "results"), "runs": [
        {"method": ["byol", "simclr", "vicreg"], "regularizer": "none"},
    ]})
    tried = []

    def fake_run(matrix: Any, experiment: Any, work_dir: Any) -> None:
        tried.append(experiment.name)
        if experiment.name.startswith("simclr"):
            raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(experiments, "run_experiment", fake_run)
    with pytest.raises(MatrixRunsFailed, match=r"^1 of 3 matrix runs failed \(simclr-cifar10-none-s0\)") as raised:
        run_matrix(path, tmp_path / "work")
    assert tried == ["byol-cifar10-none-s0", "simclr-cifar10-none-s0", "vicreg-cifar10-none-s0"]
    assert raised.value.failures == {
        "simclr-cifar10-none-s0": "ZeroDivisionError: division by zero (a bug: see its traceback above)"
    }
    err = capsys.readouterr().err
    assert err.count("Traceback (most recent call last)") == 1 and 'raise ZeroDivisionError("division by zero")' in err


def test_parallel_workers_failures_come_back_with_their_error_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--jobs 2`` with real worker processes (``python -m or_core matrix --only NAME``), both
    pointed at folders that do not exist: each worker's own error line is in the final list."""
    folders = [tmp_path / "a" / "cifar10", tmp_path / "b" / "cifar10"]
    path = _write(tmp_path / "m.yaml", {"profile": "ci", "results": str(tmp_path / "results"), "runs": [
        {"dataset": str(folders[0]), "regularizer": "none"},
        {"dataset": str(folders[1]), "regularizer": "none", "seed": 1},
    ]})
    assert main(["matrix", str(path), "--work", str(tmp_path / "work"), "--jobs", "2"]) == 2
    lines = _error_lines(capsys)
    unknown = [f"unknown data set '{folder}'" for folder in folders]
    # shown live, by run ...
    assert f"[byol-cifar10-none-s1] [matrix] failed: byol-cifar10-none-s1: {unknown[1]}" in " ".join(lines)
    # ... and listed at the end with the worker's message
    listed = [line for line in lines if line.startswith("[matrix] failed: ")]
    assert [line.split(": ")[1] for line in listed] == ["byol-cifar10-none-s0", "byol-cifar10-none-s1"]
    assert all(want in line for want, line in zip(unknown, listed, strict=True))
    assert lines[-1] == (
        "error: 2 of 2 matrix runs failed (byol-cifar10-none-s0, byol-cifar10-none-s1), each listed above with its "
        "error; fix the errors and re-run the same command to resume (recorded runs are skipped)"
    )


def test_a_mistyped_group_or_run_name_is_an_error_not_an_empty_matrix(capsys: pytest.CaptureFixture) -> None:
    matrix = str(REPO / "configs" / "matrix_cpu.yaml")
    for flag, name, phrase in (
        ("--groups", "tabel1", "no group ['tabel1']; its groups: "),
        ("--only", "byol-cifar10-so-1e-6-s9", "no run named ['byol-cifar10-so-1e-6-s9']"),
    ):
        code = main(["matrix", matrix, "--dry-run", flag, name])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and phrase in err, err
    # a chosen run by its resolved name, with any gamma of its grid, is a run of the matrix
    assert main(["matrix", matrix, "--dry-run", "--only", "byol-cifar10-so-1e-6-s1"]) == 0
