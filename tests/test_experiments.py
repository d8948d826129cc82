"""Experiment matrices and result records, on the real CIFAR-10 (and CIFAR-100 for transfer)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from or_core.backbones import build_backbone
from or_core.data import balanced_subset, load_holdout, load_split
from or_core.experiments import choose_gamma, load_matrix, run_matrix, run_name
from or_core.measure import collapse_spectra
from or_core.provenance import provenance
from or_core.records import load_records, write_record


@pytest.fixture(scope="module")
def data_root(cifar10_dir: Path, cifar100_dir: Path) -> Path:
    assert cifar10_dir.parent == cifar100_dir.parent
    return cifar10_dir.parent


def _record(reg: str, gamma: float, val: float, outside: bool = False, seed: int = 0) -> dict:
    return {
        "config": {"method": "byol", "dataset": "cifar10", "regularizer": reg, "seed": seed},
        "summary": {"gamma": gamma, "val_knn_top1": val},
        "outside_paper_grid": outside,
    }


CHOOSE = {"method": "byol", "dataset": "cifar10", "metric": "val_knn_top1",
          "grids": {"so": [1e-5, 1e-6, 1e-7], "srip": [1e-3, 1e-4, 1e-5]}}


def test_choose_gamma_takes_the_best_validation_score_inside_the_paper_grid() -> None:
    records = [
        _record("so", 1e-5, 0.30), _record("so", 1e-6, 0.35), _record("so", 1e-7, 0.33),
        _record("so", 1e-3, 0.90, outside=True),  # better, but outside the grid: never chosen
        _record("so", 1e-7, 0.99, seed=1),  # another seed: not a candidate
        _record("srip", 1e-3, 0.31),
    ]
    choice = choose_gamma(records, "so", CHOOSE)
    assert choice["gamma"] == 1e-6 and choice["candidates"] == {"1e-05": 0.30, "1e-06": 0.35, "1e-07": 0.33}
    with pytest.raises(RuntimeError, match=r"srip .*gamma \[0.0001, 1e-05\]"):
        choose_gamma(records, "srip", CHOOSE)


def test_matrix_entries_expand_and_merge(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({
        "profile": "cpu", "results": str(tmp_path / "results"),
        "runs": [
            {"group": "grid", "method": "byol", "regularizer": ["none", "so"], "gamma": [1e-5, 1e-6]},
            {"group": "seeds", "method": "byol", "regularizer": "none", "seed": [0, 1], "transfer": ["cifar100"]},
        ],
    }))
    matrix = load_matrix(path)
    names = [e.name for e in matrix.experiments]
    assert names == ["byol-cifar10-none-s0", "byol-cifar10-so-1e-5-s0", "byol-cifar10-so-1e-6-s0", "byol-cifar10-none-s1"]
    none = matrix.experiments[0]
    assert none.groups == ("grid", "seeds") and none.transfer == ("cifar100",) and "gamma" not in none.overrides
    assert run_name({"method": "simclr", "dataset": "/data/imagenet100", "regularizer": "srip", "gamma": 1e-3}) == (
        "simclr-imagenet100-srip-1e-3-s0"
    )
    path.write_text(yaml.safe_dump({"runs": [{"method": "byol", "lerning_rate": 1}]}))
    with pytest.raises(ValueError, match="unknown fields \\['lerning_rate'\\]"):
        load_matrix(path)


def test_holdout_is_disjoint_from_the_pretraining_subset(data_root: Path) -> None:
    train = load_split("cifar10", "train", data_root, subset=2048, seed=3)
    val = load_holdout("cifar10", 500, 2048, seed=3, root=data_root)
    assert len(val) == 500 and torch.bincount(val.labels).tolist() == [50] * 10
    assert not set(train.files) & set(val.files)
    assert val.files == load_holdout("cifar10", 500, 2048, seed=3, root=data_root).files
    full = load_split("cifar10", "train", data_root)
    assert set(train.files) == {full.files[i] for i in balanced_subset(full.labels, 2048, 3).tolist()}


def test_collapse_spectra_are_normalized_and_complete(data_root: Path) -> None:
    backbone, _ = build_backbone("resnet18", image_size=32, width=0.25)
    test = load_split("cifar10", "test", data_root, subset=300)
    spectra = collapse_spectra(backbone, test.images, (0.5,) * 3, (0.25,) * 3)
    assert len(spectra["weights"]) == 20 and set(spectra["hidden"]) == {"layer1", "layer2", "layer3", "layer4"}
    for values in [*spectra["weights"].values(), *spectra["hidden"].values(), spectra["representation"]]:
        assert values[0] == pytest.approx(1.0) and all(a >= b for a, b in zip(values, values[1:]))
    assert len(spectra["hidden"]["layer4"]) == 128 and len(spectra["weights"]["conv1"]) == 16
    assert spectra["so"]["conv1"] > 0 and 1 < spectra["effective_rank"]["representation"] <= 128
    json.dumps(spectra)  # plain JSON


def test_a_small_matrix_runs_chooses_gamma_on_validation_and_resumes(data_root: Path, tmp_path: Path) -> None:
    base = {
        "dataset": "cifar10", "data_root": str(data_root), "width": 0.125, "subset": 512, "epochs": 1,
        "batch_size": 64, "eval_train_subset": 500, "eval_test_subset": 200, "val_images": 200,
        "linear_epochs": 2, "knn_k": 20, "method_kwargs": {"proj_hidden_dim": 64, "proj_output_dim": 32},
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({
        "profile": "cpu", "results": str(tmp_path / "results"), "base": base,
        "choose_gamma": {**CHOOSE, "grids": {"so": [1e-5, 1e-6]}},
        "runs": [
            {"group": "grid", "method": "byol", "regularizer": "none", "transfer": ["cifar100"]},
            {"group": "grid", "method": "byol", "regularizer": "so", "gamma": [1e-5, 1e-6]},
            {"group": "pair", "method": "byol", "regularizer": "so", "gamma": "chosen", "seed": [0, 1],
             "transfer": ["cifar100"]},
        ],
    }))
    pending = run_matrix(path, tmp_path / "work", dry_run=True)
    assert pending == ["byol-cifar10-none-s0", "byol-cifar10-so-1e-5-s0", "byol-cifar10-so-1e-6-s0",
                       "byol-cifar10-so-chosen-s0", "byol-cifar10-so-chosen-s1"]
    ran = run_matrix(path, tmp_path / "work")
    records = {r["name"]: r for r in load_records(tmp_path / "results")}
    grid = {g: records[f"byol-cifar10-so-{g}-s0"]["summary"]["val_knn_top1"] for g in ("1e-5", "1e-6")}
    best = max(grid, key=lambda g: (grid[g], -float(g)))
    assert ran == ["byol-cifar10-none-s0", "byol-cifar10-so-1e-5-s0", "byol-cifar10-so-1e-6-s0", f"byol-cifar10-so-{best}-s1"]
    assert set(records) == {*ran}
    chosen_s0 = records[f"byol-cifar10-so-{best}-s0"]  # the grid's run, not trained twice
    assert chosen_s0["groups"] == ["grid", "pair"] and chosen_s0["gamma_choice"]["gamma"] == float(best)
    # the pair asks for a transfer probe: added to the grid's record from its checkpoint
    assert set(chosen_s0["transfer"]) == {"cifar100"} and set(records[f"byol-cifar10-so-{best}-s1"]["transfer"]) == {"cifar100"}
    # ... with a provenance of its own next to the training's
    (merge,) = chosen_s0["provenance"]["merges"]
    assert merge["added"] == {"groups": ["pair"], "transfer": ["cifar100"]} and "git_commit" in merge and "date_utc" in merge
    none = records["byol-cifar10-none-s0"]
    assert none["scale"] == "cpu" and none["summary"]["val_images"] == 200
    assert set(none["transfer"]["cifar100"]) >= {"linear_top1", "knn_top1"}
    assert none["transfer"]["cifar100"]["test_images"] == 200
    assert [h["epoch"] for h in none["history"]] == [1]
    assert {"git_commit", "date_utc", "device", "torch", "lightly", "command", "wall_time_s"} <= set(none["provenance"])
    assert len(none["collapse"]["weights"]) == 20
    assert run_matrix(path, tmp_path / "work") == []  # everything recorded: nothing runs again


def test_records_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    record = {"name": "x", "value": 1.5, "provenance": provenance("test", 1.0)}
    write_record(tmp_path / "a" / "x.json", record)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    (loaded,) = load_records(tmp_path)
    assert loaded["value"] == 1.5 and loaded["_path"].endswith("x.json")
    (tmp_path / "a" / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a valid JSON record"):
        load_records(tmp_path)
    with pytest.raises(FileNotFoundError, match="no results folder"):
        load_records(tmp_path / "missing")


def test_parallel_runs_start_as_soon_as_a_worker_is_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``jobs=2`` keeps two runs going while any is left, one run per process: when the short
    run ends, the next starts beside the long one (a static split would leave a core idle).
    A failed run lets the others finish; each failure comes back with its worker's error line
    (or, for a worker that died without one, its exit code and last line)."""
    from or_core import experiments

    durations = {"long": 6, "short": 1, "next": 2, "broken": 1, "killed": 1, "last": 1}  # polls until each ends
    stderr = {
        "broken": "loading\n[matrix] failed: broken: image folder not found: /x/train\nerror: 1 of 1 matrix runs failed\n",
        "killed": "epoch 1\n",
    }
    clock, started = [0], {}

    class FakeRun:
        def __init__(self, cmd: list[str], env: dict[str, str], **kwargs: object) -> None:
            assert cmd[cmd.index("--only") + 1:] == [cmd[-1]] and env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 2) // 2))
            self.name = cmd[-1]
            self.stderr = io.StringIO(stderr.get(self.name, ""))
            started[self.name] = clock[0]

        def poll(self) -> int | None:
            if clock[0] - started[self.name] < durations[self.name]:
                return None
            return {"broken": 2, "killed": -9}.get(self.name, 0)

    def tick(_: float) -> None:
        clock[0] += 1

    monkeypatch.setattr(experiments.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(experiments.time, "sleep", tick)
    matrix = load_matrix(Path(__file__).resolve().parents[1] / "configs" / "matrix_ci.yaml")
    failed = experiments._run_workers(matrix, tmp_path, 2, list(durations), None)
    assert failed == {
        "broken": "image folder not found: /x/train",
        "killed": "its worker exited with code -9; its last line on stderr: epoch 1",
    }
    assert started == {"long": 0, "short": 0, "next": 1, "broken": 3, "killed": 4, "last": 5}


def test_results_folder_given_by_the_caller_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's own ``results`` is relative to the repository; an explicit folder (the
    notebooks pass ``../results/matrix_cpu``) is taken as given, from the working directory."""
    repo = Path(__file__).resolve().parents[1]
    matrix_file = repo / "configs" / "matrix_cpu.yaml"
    assert load_matrix(matrix_file).results == repo / "results" / "matrix_cpu"
    monkeypatch.chdir(repo / "notebooks")
    given = load_matrix(matrix_file, "../results/matrix_cpu").results
    assert given.resolve() == (repo / "results" / "matrix_cpu").resolve()
    assert load_matrix(matrix_file, tmp_path / "elsewhere").results == tmp_path / "elsewhere"


def test_provenance_names_the_cpu_and_its_vector_instructions() -> None:
    """Floats differ between CPUs (results/reproducibility/refactor_reruns.json): a record says
    which one made it, model and the instruction set torch's kernels dispatch to."""
    import torch

    from or_core.provenance import cpu_description, provenance

    cpu = provenance("test")["cpu"]
    assert cpu == cpu_description() and cpu.endswith(", " + torch.backends.cpu.get_cpu_capability())
    assert len(cpu) > len(", " + torch.backends.cpu.get_cpu_capability())  # a model name before it


def test_provenance_names_the_commit_the_process_loaded_not_the_one_checked_out_later(monkeypatch) -> None:
    """A record is written when its run ends; the checkout may have moved meanwhile. The commit
    and dirty state are those read when or_core was imported: git is not asked again."""
    from or_core import provenance as prov

    loaded = prov._LOADED_STATE
    monkeypatch.setattr(prov, "_git", lambda *args: pytest.fail(f"git {args} asked again"))
    monkeypatch.delenv("OR_CORE_GIT_COMMIT", raising=False)
    assert (prov.git_commit(), prov.git_dirty()) == loaded
    assert prov.provenance("test")["git_commit"] == loaded[0] and prov.versions()["git_commit"] == loaded[0]
