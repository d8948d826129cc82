"""One trainer per run directory (or_core.run_lock): held by real processes, released, taken
over when its process is gone, and honoured by pretrain and the matrix."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from or_core.config import resolve_config
from or_core.errors import ConfigError
from or_core.experiments import run_matrix
from or_core.run_lock import LOCK_FILE, RunInUseError, lock_holder, run_lock
from or_core.train import pretrain

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from or_core.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@contextmanager
def _held(out: Path) -> Iterator[subprocess.Popen]:
    """Another live process holding the lock of ``out`` for the block; killed after it."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


def _two_seed_matrix(tmp_path: Path, profile: str, base: dict) -> Path:
    """A matrix file of BYOL without OR on seeds 0 and 1, its records in ``tmp_path / "results"``."""
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({
        "profile": profile, "results": str(tmp_path / "results"), "base": base,
        "runs": [{"group": "g", "method": "byol", "regularizer": "none", "seed": [0, 1]}],
    }))
    return path


@pytest.fixture()
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Another live process holding the lock of ``tmp_path / "run"``."""
    out = tmp_path / "run"
    with _held(out) as child:
        yield child, out


def test_the_lock_is_held_for_the_block_then_released_and_nests(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with run_lock(out):
        held = json.loads((out / LOCK_FILE).read_text())
        assert held == {"host": socket.gethostname(), "pid": os.getpid()}
        assert lock_holder(out) is None  # this process's own lock blocks nothing of its own
        with run_lock(out):  # nested in the same process: allowed, releases nothing
            pass
        assert (out / LOCK_FILE).is_file()
    assert sorted(p.name for p in out.iterdir()) == []  # released, and no draft left behind


def test_a_second_process_is_refused_while_the_first_lives_and_takes_over_when_it_is_gone(
    holder: tuple[subprocess.Popen, Path],
) -> None:
    child, out = holder
    assert lock_holder(out) == {"host": socket.gethostname(), "pid": child.pid}
    with pytest.raises(RunInUseError, match=rf"{out} is being trained by process {child.pid} on .*delete .*{LOCK_FILE}"):
        with run_lock(out):
            pass
    child.send_signal(signal.SIGKILL)  # killed: its lock stays behind, stale
    child.wait()
    assert (out / LOCK_FILE).is_file() and lock_holder(out) is None
    with run_lock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_of_another_host_counts_as_held(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": "another-machine", "pid": 1234}))
    with pytest.raises(RunInUseError, match="process 1234 on another-machine"):
        with run_lock(out):
            pass


def test_an_out_that_is_a_file_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(ConfigError, match="is a file: give the run a folder"):
            with run_lock(out):
                pass


def test_pretrain_refuses_a_run_directory_another_process_trains(holder: tuple[subprocess.Popen, Path],
                                                                   small_image_folder) -> None:
    child, out = holder
    cfg = resolve_config("ci", overrides={"dataset": str(small_image_folder(per_class=8, classes=2))})
    with pytest.raises(RunInUseError):
        pretrain(cfg, out, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written beside the holder's lock


def test_the_matrix_skips_a_run_another_process_trains_and_records_the_others(
    cifar10_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    base = {
        "dataset": "cifar10", "data_root": str(cifar10_dir.parent), "width": 0.125, "subset": 256, "epochs": 1,
        "batch_size": 64, "eval_train_subset": 200, "eval_test_subset": 100, "val_images": 100,
        "linear_epochs": 1, "knn_k": 10, "method_kwargs": {"proj_hidden_dim": 32, "proj_output_dim": 16},
    }
    path = _two_seed_matrix(tmp_path, "cpu", base)
    work = tmp_path / "work"
    with _held(work / "byol-cifar10-none-s0") as child:
        assert run_matrix(path, work) == ["byol-cifar10-none-s1"]  # no failure raised for the skipped one
    err = capfd.readouterr().err
    assert f"[matrix] skipped: byol-cifar10-none-s0: process {child.pid} on {socket.gethostname()} is training it" in err
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["byol-cifar10-none-s1.json"]
    assert not (work / "byol-cifar10-none-s1" / LOCK_FILE).exists()  # released after its record


def test_the_matrix_does_not_train_a_run_another_process_recorded_meanwhile(
    cifar10_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from or_core import experiments

    path = _two_seed_matrix(tmp_path, "ci", {"data_root": str(cifar10_dir.parent)})
    trained = []

    def fake_run(matrix, experiment, work_dir, show_progress=False):  # noqa: ANN001, ANN202
        trained.append(experiment.name)
        for name in ("byol-cifar10-none-s0", "byol-cifar10-none-s1"):  # s1: "another process" recorded it
            (tmp_path / "results").mkdir(exist_ok=True)
            (tmp_path / "results" / f"{name}.json").write_text("{}")

    monkeypatch.setattr(experiments, "run_experiment", fake_run)
    assert run_matrix(path, tmp_path / "work") == ["byol-cifar10-none-s0"]
    assert trained == ["byol-cifar10-none-s0"]


def test_the_dry_run_names_the_runs_another_process_is_training(cifar10_dir: Path, tmp_path: Path) -> None:
    path = _two_seed_matrix(tmp_path, "ci", {"data_root": str(cifar10_dir.parent)})
    work = tmp_path / "work"
    with _held(work / "byol-cifar10-none-s1") as child:
        out = subprocess.run([sys.executable, "-m", "or_core", "matrix", str(path), "--work", str(work), "--dry-run"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    host = socket.gethostname()
    assert out.stdout.strip() == (f"pending: byol-cifar10-none-s0, byol-cifar10-none-s1 (being trained by process "
                                  f"{child.pid} on {host})")
