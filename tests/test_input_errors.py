"""Bad input, small folders and faults through the command line, as a new user meets them.

Every error caused by input is one line on stderr (``error: ...``) naming the problem and the
fix, with exit code 2 and no traceback; sizes larger than a folder are clipped with a notice;
nothing wrong is ever recorded with exit code 0. Runs on small real folders cut from the shared
Imagenette-64 (``small_image_folder`` in conftest.py).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli as cli
from or_core.__main__ import main
from or_core.config import check_field, fit_to_data, resolve_config
from or_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def assert_one_line_error(code: int, err: str, *phrases: str) -> str:
    """Exit code 2 and, apart from notices, exactly one ``error:`` line holding ``phrases``."""
    lines = [line for line in err.splitlines() if not line.startswith(("notice:", "resuming "))]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tiny_folder(small_image_folder: Callable[..., Path]) -> Path:
    """300 training and 150 validation images of 3 Imagenette classes."""
    return small_image_folder(per_class=100, classes=3)


# ----------------------------------------------------------------------------------------------
# 1. Errors a person reads
# ----------------------------------------------------------------------------------------------
YAML_CASES = {
    "epochs: 1.7\n": "field 'epochs' must be an integer >= 1, got 1.7",
    "batch_size: [1, 2]\n": "field 'batch_size' must be an integer >= 1, got [1, 2]",
    "method_kwargs: 5\n": "field 'method_kwargs' must be a mapping",
    'stream: "false"\n': "field 'stream' must be true or false (unquoted), got 'false'",
    "epochz: 3\n": "unknown config field(s) ['epochz']",
    "epochs: [\n": "not valid YAML",
    "- 1\n- 2\n": "expected a mapping of config fields",
    "compile: fast\n": "field 'compile' must be true, false or one of",
    "knn_t: -0.1\n": "field 'knn_t' must be a number > 0",
}


@pytest.mark.parametrize("text", list(YAML_CASES))
def test_a_bad_config_file_is_one_line_naming_file_field_and_value(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = cli(capsys, "pretrain", "--config", path, "--out", tmp_path / "run")
    assert_one_line_error(code, err, str(path), YAML_CASES[text])
    assert not (tmp_path / "run").exists()  # refused before anything was written


FLAG_CASES = {
    ("--method", "byl"): "argument --method: invalid choice: 'byl'",
    ("--dataset", "imagenet-1k"): "unknown data set 'imagenet-1k'",
    ("--dataset", "/no/such/folder"): "no such folder: /no/such/folder",
    ("--gamma", "1e-6"): "gamma 1e-06 is set but the regularizer is none",
    ("--regularizer", "so", "--gamma", "-1"): "field 'gamma' must be a number >= 0, got -1.0",
    ("--epochs", "0"): "field 'epochs' must be an integer >= 1, got 0",
    ("--batch-size", "0"): "field 'batch_size' must be an integer >= 1, got 0",
    ("--epochs", "two"): "argument --epochs: invalid int value: 'two'",
    ("--config", "/no/such.yaml"): "config file not found: /no/such.yaml",
    ("--profile", "tpu"): "argument --profile: invalid choice: 'tpu'",
}


@pytest.mark.parametrize("flags", list(FLAG_CASES), ids=lambda f: " ".join(f))
def test_a_bad_flag_is_one_line(flags: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "pretrain", "--profile", "ci", *flags, "--out", tmp_path / "run")
    assert_one_line_error(code, err, FLAG_CASES[flags])


def test_bad_method_and_augmentation_settings_name_the_valid_ones(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for text, phrase in (
        ("method_kwargs: {proj_hidden: 3}\n", "method_kwargs: byol takes no ['proj_hidden']; valid: base_momentum"),
        ("augment_overrides: {min_scal: 0.2}\n", "augment_overrides: unknown view field(s) ['min_scal']; valid:"),
    ):
        (tmp_path / "c.yaml").write_text(text)
        code, _, err = cli(
            capsys, "pretrain", "--profile", "ci", "--config", tmp_path / "c.yaml", "--dataset", tiny_folder,
            "--out", tmp_path / "run",
        )
        assert_one_line_error(code, err, phrase)


def test_evaluate_and_matrix_name_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_error(*cli(capsys, "evaluate", tmp_path / "none")[::2], "run directory not found")
    assert_one_line_error(*cli(capsys, "evaluate", tmp_path)[::2], "has no checkpoint.pt to evaluate")
    assert_one_line_error(*cli(capsys, "matrix", tmp_path / "m.yaml")[::2], "matrix file not found")


def test_debug_shows_the_traceback_and_programming_errors_still_raise(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["pretrain", "--profile", "ci", "--epochs", "0", "--out", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match="epochs"):
        main([*argv, "--debug"])
    assert "OR_CORE_DEBUG" not in os.environ  # --debug is this call's, not the process's
    monkeypatch.setenv("OR_CORE_DEBUG", "1")
    with pytest.raises(ConfigError, match="epochs"):
        main(argv)
    monkeypatch.delenv("OR_CORE_DEBUG")

    def bug(*args, **kwargs):
        raise KeyError("a bug, not an input error")

    monkeypatch.setattr("or_core.train.pretrain", bug)
    with pytest.raises(KeyError):
        main(["pretrain", "--profile", "ci", "--out", str(tmp_path / "run")])


def test_a_real_process_prints_one_line_and_exits_with_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "or_core", "pretrain", "--epochs", "1.7", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


def test_field_values_are_normalized_or_refused() -> None:
    assert check_field("epochs", 2.0) == 2 and isinstance(check_field("epochs", 2.0), int)
    assert check_field("lr", "1e-3") == pytest.approx(1e-3) and check_field("width", 1) == 1.0
    assert check_field("subset", None) is None
    for key, value in (("epochs", True), ("lr", 0), ("lr", float("nan")), ("amp", 1), ("optimizer", "adam")):
        with pytest.raises(ConfigError, match=key):
            check_field(key, value)
    with pytest.raises(ConfigError, match="unknown regularizer 'sp'"):
        resolve_config("ci", overrides={"regularizer": "sp"})


# ----------------------------------------------------------------------------------------------
# 2. Sizes that adapt, and a failed first attempt that blocks nothing
# ----------------------------------------------------------------------------------------------
def test_the_cpu_profile_fits_imagenette(imagenette_dir: Path) -> None:
    cfg = fit_to_data(resolve_config("cpu", overrides={"dataset": str(imagenette_dir)}), notify=False)
    assert (cfg.subset, cfg.val_images) == (9469 - 9469 // 5, 9469 // 5)  # was 48000 and 2000
    assert (cfg.eval_train_subset, cfg.eval_test_subset) == (9469, 3925)  # was 50000 and 10000


def test_the_cpu_profile_trains_and_evaluates_a_300_image_folder(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    # a first attempt that fails (a batch larger than the folder) ...
    code, _, err = cli(capsys, "pretrain", "--profile", "cpu", "--dataset", tiny_folder, "--batch-size", 4096,
                       "--out", out, "--no-progress")
    assert_one_line_error(code, err, "the training set has 240 images, fewer than one batch of 4096")
    # ... does not block the corrected command in the same run directory
    code, stdout, err = cli(capsys, "pretrain", "--profile", "cpu", "--dataset", tiny_folder, "--epochs", 1,
                            "--out", out, "--no-progress")
    assert code == 0, err
    notice = [line for line in err.splitlines() if line.startswith("notice:")]
    assert len(notice) == 1 and "subset 48000 -> 240, val_images 2000 -> 60" in notice[0]
    summary = json.loads(stdout)
    assert (summary["train_images"], summary["eval_train_images"], summary["eval_test_images"]) == (240, 300, 150)
    assert summary["val_images"] == 60 and summary["val_knn_top1"] is not None
    # evaluate takes the evaluation sizes as flags, clipped to the folder too
    code, stdout, err = cli(capsys, "evaluate", out, "--eval-test-subset", 30, "--linear-epochs", 2)
    assert code == 0, err
    assert json.loads(stdout)["eval_test_images"] == 30
    code, stdout, err = cli(capsys, "evaluate", out, "--eval-test-subset", 100000)
    assert code == 0 and "eval_test_subset 100000 -> 150" in err
    assert json.loads(stdout)["eval_test_images"] == 150


# ----------------------------------------------------------------------------------------------
# 3. Never a wrong result with exit code 0
# ----------------------------------------------------------------------------------------------
def test_a_diverged_run_records_nothing_and_says_no_checkpoint_exists(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    code, _, err = cli(capsys, "pretrain", "--profile", "ci", "--dataset", tiny_folder, "--lr", "1e6",
                       "--epochs", 2, "--out", out, "--no-progress")
    assert_one_line_error(code, err, "after epoch 1", "lower the learning rate", "nothing was saved (no checkpoint yet)")
    assert not (out / "summary.json").exists() and not (out / "checkpoint.pt").exists()


def test_non_finite_weights_are_caught_before_the_checkpoint_and_the_evaluation(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    args = ["pretrain", "--profile", "ci", "--dataset", tiny_folder, "--epochs", 2, "--out", out, "--no-progress"]
    assert cli(capsys, *args, "--stop-after-epochs", 1)[0] == 0
    good = (out / "checkpoint.pt").read_bytes()
    from or_core.methods.base import SSLMethod

    original = SSLMethod.on_train_step_end

    def poison(self, progress):  # an infinite weight after the last step: every loss was finite
        original(self, progress)
        if progress >= 0.5:  # epoch 2 of 2 has one step (240 images, batch 128)
            with torch.no_grad():
                next(self.backbone.parameters()).fill_(float("inf"))

    monkeypatch.setattr(SSLMethod, "on_train_step_end", poison)
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, "non-finite weights (backbone.", "after epoch 2",
                          "the last good checkpoint (epoch 1) is kept")
    assert (out / "checkpoint.pt").read_bytes() == good and not (out / "summary.json").exists()


# ----------------------------------------------------------------------------------------------
# 4. Faults leave nothing behind
# ----------------------------------------------------------------------------------------------
def test_a_resumed_run_says_so_and_removes_the_files_of_a_killed_write(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    args = ["pretrain", "--profile", "ci", "--dataset", tiny_folder, "--epochs", 2, "--out", out, "--no-progress"]
    assert cli(capsys, *args, "--stop-after-epochs", 1)[0] == 0
    torn = out / ".checkpoint.pt.k1ll3d.tmp"  # what save_atomic leaves when killed mid-write
    torn.write_bytes(b"half a checkpoint")
    code, _, err = cli(capsys, *args)
    assert code == 0 and f"resuming {out} from epoch 1 of 2 (step 1)" in err
    assert not torn.exists() and sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json"
    ]


@pytest.fixture
def mount_tmpfs(tmp_path: Path):
    """``mount(options)``: a small tmpfs at a new folder (root only; skips elsewhere), unmounted
    at the end: a real full or read-only file system."""
    mounted = []

    def mount(options: str) -> Path:
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def test_a_full_disk_is_one_line_naming_the_file(
    tiny_folder: Path, mount_tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture
) -> None:
    full = mount_tmpfs("size=1m")  # config.yaml fits, a checkpoint (~3 MB at ci scale) does not
    code, _, err = cli(capsys, "pretrain", "--profile", "ci", "--dataset", tiny_folder, "--epochs", 1,
                       "--out", full / "run", "--no-progress")
    assert_one_line_error(code, err, f"cannot write {full / 'run' / 'checkpoint.pt'}: no space left")
    assert sorted(p.name for p in (full / "run").iterdir()) == ["config.yaml"]  # no partial file


def test_a_read_only_cache_or_run_folder_is_one_line_naming_the_path(
    tiny_folder: Path, tmp_path: Path, mount_tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_only = mount_tmpfs("size=1m,ro")
    args = ["pretrain", "--profile", "ci", "--dataset", tiny_folder, "--epochs", 1, "--no-progress"]
    code, _, err = cli(capsys, *args, "--out", read_only / "run")
    assert_one_line_error(code, err, f"cannot write {read_only / 'run'}: read-only file system")
    monkeypatch.setenv("OR_CORE_CACHE", str(read_only / "cache"))
    code, _, err = cli(capsys, *args, "--out", tmp_path / "run")
    assert_one_line_error(code, err, f"cannot write {read_only / 'cache'}: read-only file system")


def test_disk_errors_without_a_mount_are_one_line_too(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("or_core.train.pretrain", full)
    code, _, err = cli(capsys, "pretrain", "--profile", "ci", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "no space left on the device", "free some space")
