"""run_sweep on the real CIFAR-10 at a scale of seconds: what it trains, reuses, keeps and deletes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from or_core.checkpoint import load_checkpoint
from or_core.config import PretrainConfig
from or_core.sweep import UNTRAINED, run_folder_name, run_sweep
from or_core.train import build_run


def tiny(data_root: Path, **overrides) -> PretrainConfig:
    """A BYOL run of seconds: a narrow ResNet-18 on 256 real CIFAR-10 images, one epoch."""
    values = dict(
        dataset="cifar10", data_root=str(data_root), method="byol", width=0.125, subset=256, epochs=1,
        batch_size=64, eval_train_subset=300, eval_test_subset=200, linear_epochs=1, knn_k=20, val_images=0,
        profile="test", method_kwargs={"proj_hidden_dim": 64, "proj_output_dim": 32},
    )
    values.update(overrides)
    return PretrainConfig(**values)


@pytest.fixture(scope="module")
def data_root(cifar10_dir: Path) -> Path:
    return cifar10_dir.parent


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_folder_names_follow_the_reproduce_page() -> None:
    assert run_folder_name(PretrainConfig(dataset="cifar10", method="byol", regularizer="none")) == "cifar10-byol"
    assert run_folder_name(PretrainConfig(dataset="cifar10", method="byol", regularizer="srip")) == "cifar10-byol-srip"
    assert run_folder_name(PretrainConfig(dataset="/content/imagenet/", method="byol", regularizer="so")) == "imagenet-byol-so"


def test_configurations_that_would_share_a_folder_are_refused_before_any_training(tmp_path: Path) -> None:
    configs = {"SO 1e-6": PretrainConfig(regularizer="so", gamma=1e-6), "SO 1e-5": PretrainConfig(regularizer="so", gamma=1e-5)}
    with pytest.raises(ValueError, match=r"cifar10-byol-so: SO 1e-6, SO 1e-5"):
        run_sweep(configs, tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        run_sweep({}, tmp_path)
    with pytest.raises(ValueError, match="untrained reference"):
        run_sweep({UNTRAINED: PretrainConfig()}, tmp_path, untrained=True)
    assert list(tmp_path.iterdir()) == []


def test_trains_into_named_folders_collects_every_run_and_reuses_finished_ones(data_root: Path, tmp_path: Path) -> None:
    configs = {"BYOL": tiny(data_root), "BYOL + SO": tiny(data_root, regularizer="so", gamma=1e-3)}
    lines: list[str] = []
    sweep = run_sweep(configs, tmp_path, untrained=True, keep_runs=True, log=lines.append)

    assert list(sweep.runs) == [UNTRAINED, "BYOL", "BYOL + SO"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10-byol", "cifar10-byol-so"]
    assert [line.split(":")[0] for line in lines] == ["BYOL", "BYOL + SO"]
    for name, folder in (("BYOL", "cifar10-byol"), ("BYOL + SO", "cifar10-byol-so")):
        run = sweep.runs[name]
        assert run.folder == tmp_path / folder
        assert run.summary == json.loads((run.folder / "summary.json").read_text())
        assert run.summary["regularizer"] == configs[name].regularizer
        assert sweep.histories[name] == [json.loads(s) for s in (run.folder / "metrics.jsonl").read_text().splitlines()]
        assert [line["epoch"] for line in sweep.histories[name]] == [1]
        # the kept encoder carries the final weights of the run's checkpoint
        assert _equal_states(sweep.encoders[name].method.state_dict(), load_checkpoint(run.folder / "checkpoint.pt")["method"])
    assert sweep.histories["BYOL + SO"][0]["or_term"] > 0 == sweep.histories["BYOL"][0]["or_term"]

    # the untrained reference: the shared initialization, evaluated, with no history and no folder
    assert UNTRAINED not in sweep.histories and sweep.runs[UNTRAINED].folder is None
    assert sweep.summaries[UNTRAINED]["wall_time_s"] == 0.0 and 0.0 <= sweep.summaries[UNTRAINED]["knn_top1"] <= 1.0
    initial = sweep.encoders[UNTRAINED].method.backbone.state_dict()
    assert _equal_states(initial, build_run(configs["BYOL"]).method.backbone.state_dict())
    assert not _equal_states(initial, sweep.encoders["BYOL"].method.backbone.state_dict())

    # a second call finds both runs finished: nothing is trained or rewritten
    checkpoints = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/checkpoint.pt")}
    again = run_sweep(configs, tmp_path, log=None)
    assert list(again.runs) == ["BYOL", "BYOL + SO"]
    assert {n: again.summaries[n] for n in configs} == {n: sweep.summaries[n] for n in configs}
    assert again.histories == sweep.histories
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/checkpoint.pt")} == checkpoints
    assert again.encoders == {}


def test_without_a_runs_dir_the_runs_go_to_a_temporary_folder_that_is_deleted(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where TemporaryDirectory creates its folder
    sweep = run_sweep({"BYOL": tiny(data_root)}, None, keep_runs=True, log=None)
    assert list(scratch.iterdir()) == []
    run = sweep.runs["BYOL"]
    assert run.folder is None and run.summary["epochs"] == 1 and len(run.history) == 1
    assert run.run is not None  # rebuilt before the folder went
