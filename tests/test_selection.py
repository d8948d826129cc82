"""Selection that cannot leak (issue 17, item 2): gamma is chosen per method and data set on
selection seeds from the paper's grids, on a validation metric only, and no comparison uses a
selection seed. Fake records with known answers; training is mocked (seconds in all)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from or_core import experiments
from or_core.errors import ConfigError
from or_core.methods import available_methods
from or_core.experiments import GammaNotChosen, choose_gamma, load_matrix, resolve_chosen, run_matrix
from or_core.records import load_records, write_record

REPO = Path(__file__).resolve().parents[1]
GRIDS = {"so": [1e-5, 1e-6, 1e-7], "srip": [1e-3, 1e-4]}
CHOOSE = {"metric": "val_knn_top1", "selection_seeds": [100], "grids": GRIDS}


def _record(method: str, reg: str, gamma: float, seed: int, val: float | None, test: float = 0.5) -> dict:
    return {
        "name": experiments.run_name({"method": method, "regularizer": reg, "gamma": gamma, "seed": seed}),
        "config": {"method": method, "dataset": "cifar10", "regularizer": reg, "seed": seed},
        "summary": {"gamma": gamma, "val_knn_top1": val, "knn_top1": test},
        "outside_paper_grid": False,
    }


def _matrix(tmp_path: Path, runs: list[dict], choose: dict | None = None, **top: Any) -> Path:
    path = tmp_path / "m.yaml"
    spec = {"profile": "ci", "results": str(tmp_path / "results"), "choose_gamma": choose or CHOOSE, "runs": runs}
    spec.update(top)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        load_matrix(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


# ----------------------------------------------------------------------------------------------
# Choosing on fake records
# ----------------------------------------------------------------------------------------------
def test_the_choice_is_the_mean_over_the_selection_seeds_ties_to_the_smaller_gamma() -> None:
    choose = {**CHOOSE, "selection_seeds": [100, 101]}
    records = [
        # seed 100 alone would choose 1e-5; the mean over 100 and 101 chooses 1e-6
        _record("byol", "so", 1e-5, 100, 0.60), _record("byol", "so", 1e-5, 101, 0.30),   # mean 0.45
        _record("byol", "so", 1e-6, 100, 0.50), _record("byol", "so", 1e-6, 101, 0.50),   # mean 0.50
        _record("byol", "so", 1e-7, 100, 0.40), _record("byol", "so", 1e-7, 101, 0.40),   # mean 0.40
        _record("byol", "so", 1e-7, 0, 0.99),  # a comparison seed: never a candidate
        _record("byol", "so", 1e-7, 102, 0.99),  # not a selection seed either
        # SRIP: a tie, to the smaller gamma; the test metric (knn_top1) plays no part
        _record("byol", "srip", 1e-3, 100, 0.50, test=0.1), _record("byol", "srip", 1e-3, 101, 0.50, test=0.1),
        _record("byol", "srip", 1e-4, 100, 0.50, test=0.9), _record("byol", "srip", 1e-4, 101, 0.50, test=0.9),
    ]
    so = choose_gamma(records, "so", choose, "byol", "cifar10")
    assert so["gamma"] == 1e-6 and so["candidates"] == pytest.approx({"1e-05": 0.45, "1e-06": 0.50, "1e-07": 0.40})
    assert so["per_seed"]["1e-05"] == {"100": 0.60, "101": 0.30}
    assert (so["method"], so["dataset"], so["regularizer"], so["seeds"], so["metric"]) == (
        "byol", "cifar10", "so", [100, 101], "val_knn_top1")
    assert choose_gamma(records, "srip", choose, "byol", "cifar10")["gamma"] == 1e-4
    # one seed of the grid missing: no choice (a mean over fewer seeds would not be the rule)
    with pytest.raises(GammaNotChosen, match=r"no record of byol on cifar10 with gamma \[1e-05\] on seed \[101\]"):
        choose_gamma([r for r in records if r["name"] != "byol-cifar10-so-1e-5-s101"], "so", choose, "byol", "cifar10")
    # a grid record without the validation score (trained with val_images 0): no choice
    unscored = [_record("simclr", "so", g, s, None) for g in GRIDS["so"] for s in (100, 101)]
    with pytest.raises(GammaNotChosen, match="have no val_knn_top1"):
        choose_gamma(unscored, "so", choose, "simclr", "cifar10")


def test_so_parts_use_sos_grid_and_have_a_choice_of_their_own() -> None:
    records = [_record("byol", "so_diag", g, 100, v) for g, v in zip(GRIDS["so"], (0.1, 0.2, 0.3))]
    choice = choose_gamma(records, "so_diag", CHOOSE, "byol", "cifar10")
    assert choice["gamma"] == 1e-7 and set(choice["candidates"]) == {"1e-05", "1e-06", "1e-07"}


# ----------------------------------------------------------------------------------------------
# A matrix: every chosen run gets its own method's gamma
# ----------------------------------------------------------------------------------------------
PER_METHOD_RUNS = [
    {"group": "byol", "method": "byol", "regularizer": "none", "seed": [0, 1]},
    {"group": "byol", "method": "byol", "regularizer": ["so", "srip"], "gamma": "chosen", "seed": [0, 1]},
    {"group": "simclr", "method": "simclr", "regularizer": "none", "seed": [0, 1]},
    {"group": "simclr", "method": "simclr", "regularizer": "so", "gamma": "chosen", "seed": [0, 1]},
    {"group": "controls", "method": "byol", "regularizer": "so_diag", "gamma": "chosen", "seed": [0, 1]},
]
#: The validation scores the fake records say: BYOL's best SO gamma is 1e-5, SimCLR's 1e-7.
BEST = {("byol", "so"): 1e-5, ("byol", "srip"): 1e-4, ("simclr", "so"): 1e-7, ("byol", "so_diag"): 1e-6}


def _val(method: str, reg: str, gamma: float) -> float:
    return 0.6 if gamma == BEST[method, reg] else 0.4


def test_selection_runs_are_generated_per_method_on_the_selection_seeds(tmp_path: Path) -> None:
    matrix = load_matrix(_matrix(tmp_path, PER_METHOD_RUNS))
    selection = [e for e in matrix.experiments if e.selection]
    # first, one per gamma of each (method, regularizer) with a chosen run; none for SRIP of SimCLR
    assert matrix.experiments[:len(selection)] == selection
    assert [e.name for e in selection] == [
        "byol-cifar10-so-1e-5-s100", "byol-cifar10-so-1e-6-s100", "byol-cifar10-so-1e-7-s100",
        "byol-cifar10-srip-1e-3-s100", "byol-cifar10-srip-1e-4-s100",
        "simclr-cifar10-so-1e-5-s100", "simclr-cifar10-so-1e-6-s100", "simclr-cifar10-so-1e-7-s100",
        "byol-cifar10-so_diag-1e-5-s100", "byol-cifar10-so_diag-1e-6-s100", "byol-cifar10-so_diag-1e-7-s100",
    ]
    assert {e.groups for e in selection} == {("selection", "byol"), ("selection", "simclr"), ("selection", "controls")}
    assert matrix.choose["grids"]["so_diag"] == GRIDS["so"]  # the shared grid, named
    assert not any(e.overrides["seed"] == 100 for e in matrix.experiments if not e.selection)


def test_chosen_runs_resolve_to_their_own_methods_gamma(tmp_path: Path) -> None:
    matrix = load_matrix(_matrix(tmp_path, PER_METHOD_RUNS))
    for e in matrix.experiments:
        if e.selection:
            m, reg, g = e.overrides["method"], e.overrides["regularizer"], e.overrides["gamma"]
            write_record(matrix.record_path(e), _record(m, reg, g, 100, _val(m, reg, g)))
    resolved = {e.name: e for e in resolve_chosen(matrix, matrix.experiments)}
    for name in ("byol-cifar10-so-1e-5-s0", "byol-cifar10-so-1e-5-s1", "byol-cifar10-srip-1e-4-s1",
                 "simclr-cifar10-so-1e-7-s0", "simclr-cifar10-so-1e-7-s1", "byol-cifar10-so_diag-1e-6-s1"):
        choice = resolved[name].gamma_choice
        assert choice is not None and choice["seeds"] == [100] and choice["metric"] == "val_knn_top1", name
        assert choice["gamma"] == BEST[choice["method"], choice["regularizer"]] and len(choice["candidates"]) >= 2


def test_a_matrix_chooses_then_compares_on_fresh_seeds_with_training_mocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_matrix``: the selection runs first, then each chosen run at its own method's
    gamma, its record holding the choice; nothing trains twice."""
    trained: list[str] = []

    def fake_run(matrix: Any, e: Any, work_dir: Any) -> dict:
        trained.append(e.name)
        o = e.overrides
        val = _val(o["method"], o["regularizer"], o["gamma"]) if e.selection else 0.5
        record = {**_record(o["method"], o["regularizer"], o.get("gamma", 0.0), o["seed"], val), "name": e.name,
                  "groups": list(e.groups), "selection_run": e.selection, "gamma_choice": e.gamma_choice}
        write_record(matrix.record_path(e), record)
        return record

    monkeypatch.setattr(experiments, "run_experiment", fake_run)
    path = _matrix(tmp_path, PER_METHOD_RUNS)
    ran = run_matrix(path, tmp_path / "work")
    assert trained == ran and len(ran) == 11 + 4 + 8 and all(n.endswith("-s100") for n in ran[:11])
    records = {r["name"]: r for r in load_records(tmp_path / "results")}
    assert records["simclr-cifar10-so-1e-7-s1"]["gamma_choice"]["gamma"] == 1e-7
    assert records["byol-cifar10-so-1e-5-s1"]["gamma_choice"]["gamma"] == 1e-5
    assert all(r["gamma_choice"] is None for r in records.values() if r["selection_run"])
    assert run_matrix(path, tmp_path / "work") == []


# ----------------------------------------------------------------------------------------------
# Leaks refused when the file is loaded
# ----------------------------------------------------------------------------------------------
def test_a_comparison_on_a_selection_seed_is_refused(tmp_path: Path) -> None:
    message = _load_error(_matrix(tmp_path, [
        {"method": "byol", "regularizer": "none", "seed": [0, 1]},
        {"method": "byol", "regularizer": "so", "gamma": "chosen", "seed": [0, 100]},
        {"method": "byol", "regularizer": "srip", "gamma": 1e-3, "seed": 100},  # a fixed gamma: still a comparison
    ]))
    assert re.findall(r"run entry (\d+)", message) == ["2", "3"]
    assert ("run entry 2: byol-cifar10-so-chosen-s100 uses selection seed 100 (choose_gamma.selection_seeds [100]): "
            "a comparison on a seed that chose its gamma favours that gamma; give the entry other seeds") in message


@pytest.mark.parametrize("metric", ["knn_top1", "linear_top1", "val_images"])
@pytest.mark.parametrize("form", ["per-method", "single-method"])
def test_a_metric_that_is_not_a_validation_metric_is_refused(tmp_path: Path, metric: str, form: str) -> None:
    choose = {**CHOOSE, "metric": metric}
    if form == "single-method":
        choose = {"method": "byol", "dataset": "cifar10", "metric": metric, "grids": GRIDS}
    message = _load_error(_matrix(tmp_path, [{"method": "byol", "regularizer": "none", "seed": 1}], choose))
    assert f"choose_gamma: metric {metric!r} is not a validation metric" in message and "use val_knn_top1" in message


@pytest.mark.parametrize(("choose", "phrase"), [
    ({**CHOOSE, "method": "byol"}, "choose_gamma: method belong to the single-method form"),
    ({**CHOOSE, "selection_seeds": []}, "'selection_seeds' must be a non-empty list of distinct integers >= 0"),
    ({**CHOOSE, "selection_seeds": [100, 100]}, "distinct integers"),
    ({**CHOOSE, "selection_seeds": 100}, "got 100"),
    ({**CHOOSE, "grids": {"srip": [1e-3]}}, "run entry 1: gamma: chosen needs a grid for regularizer 'so_diag' (or "
     "one for 'so', whose grid it shares) in choose_gamma.grids (it has srip)"),
], ids=["mixed-forms", "no-seeds", "repeated-seed", "not-a-list", "no-grid"])
def test_a_bad_selection_block_is_one_line(tmp_path: Path, choose: dict, phrase: str) -> None:
    runs = [{"method": "byol", "regularizer": "so_diag", "gamma": "chosen", "seed": 1}]
    assert phrase in _load_error(_matrix(tmp_path, runs, choose))


def test_selection_without_a_validation_split_or_with_two_setups_is_refused(tmp_path: Path) -> None:
    runs = [{"method": "byol", "regularizer": "so", "gamma": "chosen", "seed": 1}]
    message = _load_error(_matrix(tmp_path, runs, base={"val_images": 0}))
    assert "choose_gamma: selection run byol-cifar10-so-1e-5-s100 and 2 more has no validation split" in message
    message = _load_error(_matrix(tmp_path, [*runs, {"method": "byol", "regularizer": "so", "gamma": "chosen",
                                                     "seed": 2, "epochs": 3}]))
    assert ("gamma: chosen runs byol-cifar10-so-chosen-s1 and byol-cifar10-so-chosen-s2 (byol on cifar10 with so) "
            "differ in ['epochs']") in message


# ----------------------------------------------------------------------------------------------
# configs/matrix_cpu_paired.yaml
# ----------------------------------------------------------------------------------------------
def test_the_paired_cpu_matrix_has_its_seeds_per_arm_and_no_leak(tmp_path: Path) -> None:
    path = REPO / "configs" / "matrix_cpu_paired.yaml"
    matrix = load_matrix(path, tmp_path / "results")
    assert matrix.per_method and matrix.choose["metric"] == "val_knn_top1"
    seeds = set(matrix.choose["selection_seeds"])
    comparisons = [e for e in matrix.experiments if not e.selection]
    selection = [e for e in matrix.experiments if e.selection]
    assert not any(e.overrides["seed"] in seeds for e in comparisons)
    assert {e.overrides["seed"] for e in selection} == seeds
    arms = Counter((e.overrides["method"], e.overrides["regularizer"]) for e in comparisons)
    five = {(m, r): 5 for m in ("byol", "simclr") for r in ("none", "so", "srip", "so_diag", "so_offdiag")}
    three = {(m, r): 3 for m in ("barlowtwins", "vicreg") for r in ("none", "so", "srip")}
    # group `methods`: every registered method once without OR, on seed 0
    once = {(m, "none"): 1 for m in available_methods() if m not in ("byol", "simclr", "barlowtwins", "vicreg")}
    assert arms == {**five, **three, **once}
    assert {e.overrides["method"] for e in comparisons if "methods" in e.groups} == set(available_methods())
    # the arms of one method share their seeds (paired), and every comparison is on CIFAR-10
    for method in ("byol", "simclr", "barlowtwins", "vicreg"):
        assert len({tuple(sorted(e.overrides["seed"] for e in comparisons if e.overrides["method"] == method
                                 and e.overrides["regularizer"] == r)) for (m, r) in arms if m == method}) == 1
    assert {e.overrides["dataset"] for e in matrix.experiments} == {"cifar10"}
    # a grid per (method, regularizer) chosen, on each selection seed
    chosen = {(e.overrides["method"], e.overrides["regularizer"]) for e in comparisons if e.needs_chosen_gamma}
    grid = Counter((e.overrides["method"], e.overrides["regularizer"]) for e in selection)
    assert grid == {key: len(matrix.choose["grids"][key[1]]) * len(seeds) for key in chosen}
    # the header's counts, and parts that run on their own
    pending = run_matrix(path, tmp_path / "work", results=tmp_path / "results", dry_run=True)
    assert (len(selection), len(comparisons), len(pending)) == (36, 82, 118)
    header = f"{len(pending)} trainings = {len(selection)} selection runs + {len(comparisons)} comparison runs"
    assert header in path.read_text()
    byol = run_matrix(path, tmp_path / "work", groups=["byol"], results=tmp_path / "results", dry_run=True)
    assert len(byol) == 6 + 15 and sum(n.endswith("-s100") for n in byol) == 6
