"""or_core.report on hand-built records whose numbers are known, so every table, difference and
verdict can be checked exactly; figures are checked through their axes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pd = pytest.importorskip("pandas")
matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("seaborn")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from or_core import plots, report  # noqa: E402
from or_core.records import write_record  # noqa: E402

STAGES = ("layer1", "layer2", "layer3", "layer4")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _decay(n: int, rate: float) -> list[float]:
    """A normalized spectrum ``rate**i``: 1 is flat, smaller decays faster."""
    return [rate**i for i in range(n)]


def _record(
    method: str = "byol",
    dataset: str = "cifar10",
    regularizer: str = "none",
    gamma: float | None = None,
    seed: int = 0,
    knn: float = 0.5,
    linear: float = 0.6,
    rate: float = 0.5,
    so_total: float = 100.0,
    erank: float = 10.0,
    scale: str = "cpu-small",
    **extra: Any,
) -> dict[str, Any]:
    """A minimal run record; ``rate`` sets how fast every stored spectrum decays."""
    name = f"{method}-{dataset}-{regularizer}" + (f"-{gamma:.0e}" if regularizer != "none" else "") + f"-s{seed}"
    spectra = {
        "weights": {"conv1": _decay(4, rate), "layer1.0.conv1": _decay(8, rate), "layer1.1.conv2": _decay(8, rate),
                    "layer2.0.downsample.0": _decay(8, rate), "layer2.1.conv2": _decay(16, rate)},
        "so": {"conv1": 1.0},
        "hidden": {stage: _decay(8, rate) for stage in STAGES},
        "representation": _decay(16, rate),
        "effective_rank": {"representation": erank},
    }
    record = {
        "name": name, "matrix": "m.yaml", "groups": ["methods"], "outside_paper_grid": False, "scale": scale,
        "config": {"method": method, "dataset": dataset, "regularizer": regularizer, "gamma": gamma, "seed": seed,
                   "width": 0.25, "epochs": 5, "backbone": "resnet18"},
        "summary": {"gamma": gamma, "knn_top1": knn, "knn_top5": knn + 0.3, "linear_top1": linear,
                    "linear_top5": linear + 0.3, "val_knn_top1": knn - 0.01, "effective_rank": erank, "rankme": erank,
                    "or_so_total": so_total, "wall_time_s": 10.0},
        "gamma_choice": None, "history": [], "collapse": spectra, "transfer": {},
        "provenance": {"date_utc": "2026-01-01T00:00:00+00:00"},
    }
    record.update(extra)
    return record


@pytest.fixture()
def records() -> list[dict[str, Any]]:
    """BYOL and SimCLR on two data sets, none / SO / SRIP, BYOL with three paired seeds, a gamma
    grid, a gamma outside the grid, feature whitening and transfer probes. OR helps everywhere
    except SRIP on SimCLR/CIFAR-100 and BYOL seed 1."""
    rs = [
        _record(knn=0.50, linear=0.60, rate=0.5, so_total=100, erank=10,
                transfer={"cifar100": {"linear_top1": 0.20, "linear_top5": 0.4, "knn_top1": 0.1}}),
        _record(regularizer="so", gamma=1e-6, knn=0.53, linear=0.62, rate=0.8, so_total=40, erank=12,
                gamma_choice={"gamma": 1e-6}, transfer={"cifar100": {"linear_top1": 0.25, "linear_top5": 0.5, "knn_top1": 0.1}}),
        _record(regularizer="so", gamma=1e-5, knn=0.70, linear=0.70, rate=0.8, so_total=30),  # not chosen
        _record(regularizer="so", gamma=1e-1, knn=0.90, linear=0.90, outside_paper_grid=True),  # outside the grid
        _record(regularizer="srip", gamma=1e-3, knn=0.52, linear=0.61, rate=0.7, so_total=90, erank=11),
        _record(seed=1, knn=0.52), _record(regularizer="so", gamma=1e-6, seed=1, knn=0.51, gamma_choice={"gamma": 1e-6}),
        _record(seed=2, knn=0.54), _record(regularizer="so", gamma=1e-6, seed=2, knn=0.58, gamma_choice={"gamma": 1e-6}),
        _record(method="byol_whitening", knn=0.51, linear=0.60, rate=0.6, erank=14),
        _record(dataset="cifar100", knn=0.20, linear=0.25),
        _record(dataset="cifar100", regularizer="so", gamma=1e-6, knn=0.22, linear=0.27, rate=0.8, so_total=40),
        _record(method="simclr", knn=0.40, linear=0.45),
        _record(method="simclr", regularizer="so", gamma=1e-6, knn=0.41, linear=0.47, rate=0.8, so_total=40),
        _record(method="simclr", dataset="cifar100", knn=0.15, linear=0.20),
        _record(method="simclr", dataset="cifar100", regularizer="srip", gamma=1e-3, knn=0.14, linear=0.18),
    ]
    return rs


@pytest.fixture()
def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    return report.records_frame(records)


# ----------------------------------------------------------------------------------------------
# Records as a frame
# ----------------------------------------------------------------------------------------------
def test_spectrum_effective_rank_matches_the_data_matrix_definition() -> None:
    torch = pytest.importorskip("torch")
    from or_core.diagnostics import covariance_eigenvalues, effective_rank

    assert report.spectrum_effective_rank([1.0] * 7) == pytest.approx(7.0)
    assert report.spectrum_effective_rank([1.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert math.isnan(report.spectrum_effective_rank([]))
    x = torch.randn(400, 12, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)
    eigenvalues = covariance_eigenvalues(x)
    assert report.spectrum_effective_rank(eigenvalues.tolist()) == pytest.approx(effective_rank(x), rel=1e-9)
    # scaling the spectrum (the records store it divided by the largest value) changes nothing
    assert report.spectrum_effective_rank((eigenvalues / eigenvalues.max()).tolist()) == pytest.approx(effective_rank(x))


def test_records_frame_has_one_row_per_run_record(records: list[dict[str, Any]], frame: pd.DataFrame) -> None:
    assert len(frame) == len(records)
    frame2 = report.records_frame([*records, {"benchmark": "or_overhead", "runs": []}])  # not a run record
    assert len(frame2) == len(records)
    row = frame[frame["name"] == "byol-cifar10-so-1e-06-s0"].iloc[0]
    assert row["gamma"] == 1e-6 and row["gamma_chosen"] and row["knn_top1"] == 0.53 and row["seed"] == 0
    none = frame[frame["name"] == "byol-cifar10-none-s0"].iloc[0]
    assert math.isnan(none["gamma"]) and not none["gamma_chosen"] and none["groups"] == "methods"
    flat = report.records_frame([_record(rate=1.0)]).iloc[0]
    assert flat["weight_flatness"] == pytest.approx(1.0) and flat["hidden_flatness"] == pytest.approx(1.0)
    assert 0 < none["weight_flatness"] < row["weight_flatness"] < 1  # rate 0.5 decays faster than 0.8
    empty = report.records_frame([])
    assert empty.empty and list(empty.columns) == list(report.COLUMNS)
    assert report.scale_label(frame) == "cpu-small" and report.scale_label([]) == report.NO_RECORDS


def test_select_runs_prefers_the_chosen_gamma_then_the_best_validation(frame: pd.DataFrame) -> None:
    chosen = report.select_runs(frame)
    so = chosen[(chosen["method"] == "byol") & (chosen["dataset"] == "cifar10") & (chosen["regularizer"] == "so")]
    assert so["name"].tolist() == ["byol-cifar10-so-1e-06-s0"]  # chosen, although 1e-5 scored higher
    assert not chosen["outside_paper_grid"].any()
    unchosen = report.records_frame([_record(regularizer="so", gamma=g, knn=k) for g, k in ((1e-5, 0.3), (1e-6, 0.4))])
    assert report.select_runs(unchosen)["gamma"].tolist() == [1e-6]  # best val_knn_top1 without a choice
    assert len(report.select_runs(frame, seed=None).query("method == 'byol' and dataset == 'cifar10'")) == 7


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def test_accuracy_table_differences_and_gaps(frame: pd.DataFrame) -> None:
    table = report.accuracy_table(frame, ("knn_top1", "linear_top1"))
    assert table.index.tolist() == [("byol", "cifar10"), ("byol", "cifar100"), ("simclr", "cifar10"), ("simclr", "cifar100")]
    byol = table.loc[("byol", "cifar10")]
    assert byol[("knn_top1", "none")] == 0.50 and byol[("knn_top1", "so")] == 0.53
    assert byol[("knn_top1", "SO - none")] == pytest.approx(0.03)
    assert byol[("linear_top1", "SRIP - none")] == pytest.approx(0.01)
    assert byol[("gamma", "so")] == 1e-6 and byol[("gamma", "srip")] == 1e-3
    assert math.isnan(table.loc[("simclr", "cifar100"), ("knn_top1", "so")])  # not recorded: a gap
    assert table.loc[("simclr", "cifar100"), ("knn_top1", "SRIP - none")] == pytest.approx(-0.01)
    assert report.accuracy_table(report.records_frame([])).empty
    assert "1e-6" in report.styled(table).to_html()


def test_gamma_table_and_table1(frame: pd.DataFrame) -> None:
    gammas = report.gamma_table(frame)
    assert gammas["gamma"].tolist() == [1e-6, 1e-5, 1e-1, 1e-3]
    assert gammas["outside_paper_grid"].tolist() == [False, False, True, False]
    assert gammas["knn_top1 - none"].tolist() == pytest.approx([0.03, 0.20, 0.40, 0.02])
    t1 = report.table1(frame)
    assert t1.index.tolist() == ["BYOL", "BYOL + feature whitening", "BYOL + SO", "BYOL + SRIP"]
    assert t1.loc["BYOL + SO", "linear_top1"] == 0.62 and t1.loc["BYOL + feature whitening", "effective_rank"] == 14
    partial = report.table1(report.records_frame([_record()]))
    assert partial.loc["BYOL", "knn_top1"] == 0.5 and partial.loc["BYOL + SO"].drop("name").isna().all()


def test_paired_seeds_mean_std_and_wins(frame: pd.DataFrame) -> None:
    paired = report.paired_seeds(frame)
    assert paired.index.tolist() == [0, 1, 2]
    assert paired[("knn_top1", "SO - none")].tolist() == pytest.approx([0.03, -0.01, 0.04])
    summary = report.paired_summary(paired).loc["knn_top1"]
    assert summary["seeds"] == 3 and summary["wins"] == 2
    assert summary["SO - none mean"] == pytest.approx(0.02)
    assert summary["SO - none std"] == pytest.approx(np.std([0.03, -0.01, 0.04], ddof=1))
    assert summary["none mean"] == pytest.approx(0.52) and summary["SO mean"] == pytest.approx(np.mean([0.53, 0.51, 0.58]))
    lonely = report.paired_seeds(report.records_frame([_record(seed=5)]))  # no partner: left out
    assert lonely.empty and report.paired_summary(lonely).loc["knn_top1", "wins"] == 0


def test_paired_values_and_effects_pair_each_arm_with_its_seed(frame: pd.DataFrame) -> None:
    values = report.paired_values(frame)
    # every seed of BYOL/CIFAR-10, the chosen gamma of SO (1e-6), SRIP on seed 0 only
    assert values.index.tolist() == [0, 1, 2] and values.columns.tolist() == ["none", "so", "srip"]
    assert values["none"].tolist() == pytest.approx([0.50, 0.52, 0.54])
    assert values["so"].tolist() == pytest.approx([0.53, 0.51, 0.58])
    assert values["srip"].iloc[0] == pytest.approx(0.52) and values["srip"].iloc[1:].isna().all()
    effects = report.paired_effects(values).set_index("regularizer")
    d = np.array([0.03, -0.01, 0.04])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    so = effects.loc["so"]
    assert so["seeds"] == 3 and so["effect"] == pytest.approx(0.02)
    assert (so["ci_low"], so["ci_high"]) == pytest.approx((0.02 - half, 0.02 + half))
    assert so["verdict"] == report.NO_EFFECT  # the interval contains 0
    srip = effects.loc["srip"]
    assert srip["seeds"] == 1 and srip["verdict"] == report.TOO_FEW and math.isnan(srip["ci_low"])
    assert report.paired_values(frame, method="wmse").empty


def test_paired_figure_draws_every_seed_and_each_interval(frame: pd.DataFrame) -> None:
    fig = plots.paired_figure(frame)
    left, right = fig.axes
    assert len(left.lines) == 3  # one line per seed
    assert [t.get_text() for t in left.get_xticklabels()] == ["none", "SO", "SRIP"]
    d = np.array([0.03, -0.01, 0.04])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)
    # the SO interval: the vertical segment of its error bar runs from the low to the high end
    segments = right.collections[0].get_segments()
    assert [segments[0][0][1], segments[0][1][1]] == pytest.approx([0.02 - half, 0.02 + half])
    assert [t.get_text() for t in right.get_xticklabels()] == ["SO\n(3 pairs)", "SRIP\n(1 pair)"]
    empty = plots.paired_figure(report.records_frame([]))
    assert [t.get_text() for ax in empty.axes for t in ax.texts] == ["no data yet", "no data yet"]


def test_transfer_table(records: list[dict[str, Any]]) -> None:
    table = report.transfer_table(records)
    assert table["target"].tolist() == ["cifar100", "cifar100"]
    assert table["regularizer"].tolist() == ["none", "so"] and table["linear_top1"].tolist() == [0.20, 0.25]
    assert report.transfer_table([]).empty


def test_transfer_claim_pairs_probes_by_seed_and_never_across_seeds() -> None:
    def probe(value: float) -> dict[str, Any]:
        return {"transfer": {"cifar100": {"linear_top1": value}}}

    records = [
        _record(**probe(0.20)), _record(seed=1, **probe(0.30)),
        _record(regularizer="so", gamma=1e-6, **probe(0.26)),  # seed 0: +0.06
        _record(regularizer="so", gamma=1e-6, seed=1, **probe(0.33)),  # seed 1: +0.03
        _record(regularizer="so", gamma=1e-6, seed=2, **probe(0.24)),  # seed 2 unprobed without OR: no partner
    ]
    table = report.claims(report.records_frame(records), records).loc["transfer"]
    row = table.iloc[0]
    assert row["comparison"] == "BYOL / CIFAR-10 / SO (gamma 1e-6) -> CIFAR-100"
    # two pairs: mean 0.045, sd 0.03 / sqrt(2), half width t_{0.975,1} * sd / sqrt(2) = 12.706 * 0.015
    half = math.tan(math.pi * 0.475) * 0.015
    assert (row["seeds"], row["verdict"]) == (2, report.NO_EFFECT)
    assert row["effect"] == pytest.approx(0.045) and (row["ci_low"], row["ci_high"]) == pytest.approx((0.045 - half, 0.045 + half))
    assert row["differences"] == "s0: +0.06; s1: +0.03; s2: not measured"


# ----------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------
T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2}, closed form (see tests/test_stats.py)


def test_verdict_rule() -> None:
    assert report.verdict([]) == report.NO_DATA
    assert report.verdict([math.nan]) == report.NO_DATA
    assert report.verdict([0.1]) == report.TOO_FEW
    assert report.verdict([0.9, 1.0, 1.1]) == report.SUPPORTED
    assert report.verdict([1.0, 2.0, 3.0]) == report.NO_EFFECT  # mean 2, CI 2 +- 2.4841
    assert report.verdict([-1.1, -1.0, -0.9]) == report.CONTRADICTED
    assert "paired-t" in report.VERDICT_RULE


def _rows(table: pd.DataFrame, key: str) -> dict[str, pd.Series]:
    """``{comparison: row}`` of one claim."""
    return {row["comparison"]: row for _, row in table.loc[[key]].iterrows()}


def test_claims_on_no_records_are_no_data_yet() -> None:
    table = report.claims(report.records_frame([]), [])
    assert len(table) >= 10 and set(table["verdict"]) == {report.NO_DATA}
    assert set(table["comparison"]) == {report.ALL_COMPARISONS} and table.index.is_unique
    assert (table["seeds"] == 0).all() and (table["scale"] == report.NO_RECORDS).all()


def test_claims_are_computed_per_comparison_from_the_records(frame: pd.DataFrame, records: list[dict[str, Any]]) -> None:
    table = report.claims(frame, records)
    assert list(table.columns[:6]) == list(report.CLAIM_COLUMNS)
    so = _rows(table, "accuracy_so")  # linear top-1: byol/10 seeds +0.02, 0, 0; byol/100 +0.02; simclr/10 +0.02
    byol = so["BYOL / CIFAR-10 / SO (gamma 1e-6)"]
    sd = float(np.std([0.02, 0.0, 0.0], ddof=1))
    assert byol["seeds"] == 3 and byol["effect"] == pytest.approx(0.02 / 3)
    assert (byol["ci_low"], byol["ci_high"]) == pytest.approx((0.02 / 3 - T2 * sd / math.sqrt(3), 0.02 / 3 + T2 * sd / math.sqrt(3)))
    assert byol["verdict"] == report.NO_EFFECT and byol["differences"] == "s0: +0.02; s1: +0; s2: +0"
    assert byol["95% CI"] == f"[{byol['ci_low']:+.4g}, {byol['ci_high']:+.4g}]"
    for name in ("BYOL / CIFAR-100 / SO (gamma 1e-6)", "SimCLR / CIFAR-10 / SO (gamma 1e-6)"):
        assert (so[name]["seeds"], so[name]["verdict"], so[name]["95% CI"]) == (1, report.TOO_FEW, "-")
        assert so[name]["effect"] == pytest.approx(0.02)
    assert so[report.ALL_COMPARISONS]["verdict"] == (
        "of 1 comparison with >= 2 seeds: supported in 0, no detectable effect in 1, contradicted in 0; "
        "2 comparisons with too few seeds")
    seeds = _rows(table, "seeds")  # kNN top-1 per seed: +0.03, -0.01, +0.04
    assert seeds["BYOL / CIFAR-10 / SO (gamma 1e-6)"]["verdict"] == report.NO_EFFECT
    assert seeds["BYOL / CIFAR-10 / SO (gamma 1e-6)"]["effect"] == pytest.approx(0.02)
    srip = _rows(table, "accuracy_srip")  # one seed each: no verdict
    assert {r["verdict"] for c, r in srip.items() if c != report.ALL_COMPARISONS} == {report.TOO_FEW}
    assert srip[report.ALL_COMPARISONS]["verdict"] == "no comparison with >= 2 seeds; 2 comparisons with too few seeds"
    # ||G||^2 fell by 60 on seed 0 and stayed at 100 on seeds 1 and 2: the interval holds 0
    assert _rows(table, "orthogonality")["BYOL / CIFAR-10 / SO (gamma 1e-6)"]["effect"] == pytest.approx(20.0)
    assert _rows(table, "whitening_representation")["(BYOL + whitening) - BYOL / CIFAR-10"]["effect"] == pytest.approx(4.0)
    inside = _rows(table, "whitening_inside")
    assert set(inside) == {"weight flatness: (BYOL + SO) - (BYOL + whitening) / CIFAR-10",
                           "hidden-feature flatness: (BYOL + SO) - (BYOL + whitening) / CIFAR-10", report.ALL_COMPARISONS}
    lines = report.claim_lines(table)
    assert lines.loc["accuracy_so", ["comparisons", report.NO_EFFECT, report.TOO_FEW]].tolist() == [3, 1, 2]
    view = report.claims_view(table)
    assert list(view.columns) == list(report.CLAIM_COLUMNS) and view.loc["accuracy_so", "claim"].tolist()[1] == ""


def test_claims_with_several_seeds_can_be_supported_or_contradicted() -> None:
    """Three seeds of SimCLR with SO (linear +0.02, +0.03, +0.025: CI 0.025 +- 0.0124) and of
    SimCLR on CIFAR-100 with SO (-0.02, -0.03, -0.025)."""
    records = []
    for seed, delta in enumerate((0.02, 0.03, 0.025)):
        records += [_record(method="simclr", seed=seed, linear=0.4),
                    _record(method="simclr", regularizer="so", gamma=1e-6, seed=seed, linear=0.4 + delta),
                    _record(method="simclr", dataset="cifar100", seed=seed, linear=0.3),
                    _record(method="simclr", dataset="cifar100", regularizer="so", gamma=1e-6, seed=seed, linear=0.3 - delta)]
    table = report.claims(report.records_frame(records), records)
    so = _rows(table, "accuracy_so")
    up, down = so["SimCLR / CIFAR-10 / SO (gamma 1e-6)"], so["SimCLR / CIFAR-100 / SO (gamma 1e-6)"]
    half = T2 * 0.005 / math.sqrt(3)  # sd of (0.02, 0.03, 0.025) is 0.005
    assert (up["verdict"], up["seeds"]) == (report.SUPPORTED, 3)
    assert (up["ci_low"], up["ci_high"]) == pytest.approx((0.025 - half, 0.025 + half), rel=1e-6)
    assert down["verdict"] == report.CONTRADICTED and down["ci_high"] == pytest.approx(-0.025 + half, rel=1e-6)
    assert so[report.ALL_COMPARISONS]["verdict"] == (
        "of 2 comparisons with >= 2 seeds: supported in 1, no detectable effect in 0, contradicted in 1")
    text = report.claims_summary(table)
    lines = {line.split("**")[1]: line for line in text.splitlines() if line.startswith("* **")}
    assert "SimCLR / CIFAR-10 / SO (gamma 1e-6): +0.025, 95% CI [" in lines["Supported"]
    assert "SimCLR / CIFAR-100 / SO (gamma 1e-6): -0.025" in lines["Contradicted"]


def test_hidden_features_leave_out_the_last_stage_which_is_the_representation() -> None:
    """layer4 pooled is the representation: a collapsed layer4 must not move hidden_flatness,
    and a record without stages before the last leaves the hidden claim "not measured"."""
    record = _record(rate=1.0)
    record["collapse"]["hidden"]["layer4"] = _decay(8, 0.01)  # collapsed, like the representation
    record["collapse"]["representation"] = _decay(8, 0.01)
    row = report.records_frame([record]).iloc[0]
    assert row["hidden_flatness"] == pytest.approx(1.0) and row["representation_flatness"] < 0.3
    assert list(report.hidden_stages(record["collapse"]["hidden"])) == ["layer1", "layer2", "layer3"]

    pair = [_record(), _record(regularizer="so", gamma=1e-6, rate=0.8)]
    for r in pair:
        r["collapse"]["hidden"] = {"layer4": r["collapse"]["representation"]}  # the last stage only
    table = report.claims(report.records_frame(pair), pair)
    hidden = _rows(table, "hidden")["BYOL / CIFAR-10 / SO (gamma 1e-6)"]
    assert (hidden["verdict"], hidden["seeds"], hidden["differences"]) == (report.NOT_MEASURED, 0, "s0: not measured")
    assert "1 comparison not measured" in _rows(table, "hidden")[report.ALL_COMPARISONS]["verdict"]
    assert _rows(table, "representation")["BYOL / CIFAR-10 / SO (gamma 1e-6)"]["verdict"] == report.TOO_FEW
    assert "**Not measured**" in report.claims_summary(table)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def test_spectra_figure_is_log_scale_with_one_line_per_run(records: list[dict[str, Any]]) -> None:
    fig = plots.spectra_figure(records, "weights")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["layer1.1.conv2", "layer2.1.conv2"]  # each stage's last conv
    for ax in panels:
        assert ax.get_yscale() == "log" and len(ax.get_lines()) == 3  # BYOL, whitening, SO
    assert "[cpu-small records]" in fig._suptitle.get_text()
    line = panels[0].get_lines()[0]
    assert line.get_ydata()[0] == 1.0 and len(line.get_xdata()) == 8

    fig = plots.figure2(records)
    assert [ax.get_title() for ax in fig.axes] == ["weights: layer2.1.conv2", "hidden features: layer3", "representation"]
    assert all(len(ax.get_lines()) == 3 for ax in fig.axes)
    # BYOL and BYOL + SO have three seeds (the same spectra here): a mean line and a band each
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["BYOL (mean of 3 seeds)", "BYOL + whitening", "BYOL + SO (gamma 1e-6) (mean of 3 seeds)"]
    assert all(len(ax.collections) == 2 for ax in fig.axes)
    assert report.SEED_BANDS in fig._suptitle.get_text()
    single = plots.figure2(records, runs=report.figure2_runs(records, seed=0))  # one seed: no band, no note
    assert all(not ax.collections for ax in single.axes) and report.SEED_BANDS not in single._suptitle.get_text()
    fig = plots.stage_spectra_figure(records)
    assert [ax.get_title() for ax in fig.axes] == list(STAGES)
    assert all(len(ax.get_lines()) == 3 and ax.get_yscale() == "log" for ax in fig.axes)  # none, SO, SRIP
    with pytest.raises(ValueError, match="kind"):
        plots.spectra_figure(records, "gradients")


def test_figures_of_no_records_say_no_data_yet() -> None:
    for fig in (plots.figure2([]), plots.spectra_figure([], "hidden"), plots.stage_spectra_figure([]),
                plots.gamma_response(report.records_frame([]))):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert texts and set(texts) == {"no data yet"}
        assert "no records yet" in fig._suptitle.get_text()


def test_gamma_response_marks_the_grid_the_choice_and_the_baseline(frame: pd.DataFrame) -> None:
    from matplotlib.collections import LineCollection, PathCollection

    fig = plots.gamma_response(frame)
    ax = fig.axes[1]  # test kNN
    assert ax.get_xscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}  # not the caps
    assert list(lines) == ["BYOL + SO", "BYOL + SRIP", "BYOL without OR (mean of 3 seeds)"]
    assert lines["BYOL without OR (mean of 3 seeds)"].get_ydata()[0] == pytest.approx(0.52)  # mean of 0.50, 0.52, 0.54
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    hollow = [c for c in points if c.get_facecolors().size and np.allclose(c.get_facecolors()[:, :3], 1.0)]
    ringed = [c for c in points if not c.get_facecolors().size]
    assert np.allclose(ringed[0].get_offsets(), [[1e-6, 0.54]]) and len(ringed) == 1  # chosen: mean of 0.53, 0.51, 0.58
    assert len(hollow) == 1 and hollow[0].get_offsets().tolist() == [[0.1, 0.9]]  # outside the grid
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]  # min-max over the three seeds at 1e-6
    assert len(bars) == 1 and np.allclose(bars[0].get_segments()[0], [[1e-6, 0.51], [1e-6, 0.58]])
    band = ax.patches[0].get_extents().transformed(ax.transData.inverted())  # the baseline's seeds: 0.50 to 0.54
    assert (band.y0, band.y1) == pytest.approx((0.50, 0.54))
    assert "cpu-small" in fig._suptitle.get_text() and "min to max" in fig._suptitle.get_text()


def test_save_spectra_figure_falls_back_and_says_so(records: list[dict[str, Any]], tmp_path: Path) -> None:
    ci = [_record(scale="cpu-ci"), _record(method="byol_whitening", scale="cpu-ci")]
    path = tmp_path / "figures" / "spectra.png"
    fig = plots.save_spectra_figure([], ci, path)
    assert path.is_file() and "FALLBACK" in fig._suptitle.get_text() and "cpu-ci" in fig._suptitle.get_text()
    fig = plots.save_spectra_figure(records, ci, path)
    assert "FALLBACK" not in fig._suptitle.get_text() and "cpu-small" in fig._suptitle.get_text()


# ----------------------------------------------------------------------------------------------
# Bookkeeping
# ----------------------------------------------------------------------------------------------
def test_missing_runs_and_matrix_records(tmp_path: Path) -> None:
    results = tmp_path / "results"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({
        "profile": "cpu", "results": str(results),
        "runs": [{"group": "g", "method": "byol", "regularizer": ["none", "so"], "gamma": 1e-6, "seed": [0, 1]}],
    }))
    assert report.missing_runs(path)["name"].tolist() == [
        "byol-cifar10-none-s0", "byol-cifar10-none-s1", "byol-cifar10-so-1e-6-s0", "byol-cifar10-so-1e-6-s1"]
    assert report.matrix_records(path) == [] and report.load_folder(results) == []
    write_record(results / "byol-cifar10-none-s0.json", {**_record(), "name": "byol-cifar10-none-s0"})
    write_record(results / "stale.json", {**_record(), "name": "a-run-no-longer-in-the-file"})
    missing = report.missing_runs(path)
    assert len(missing) == 3 and "byol-cifar10-none-s0" not in missing["name"].tolist()
    assert set(missing["groups"]) == {"g"}
    assert [r["name"] for r in report.matrix_records(path)] == ["byol-cifar10-none-s0"]
    assert report.matrix_runs(path).index.tolist()[0] == "byol-cifar10-none-s0"
    assert report.missing_runs(tmp_path / "absent.yaml").empty
    summary = report.folders_summary({"a": report.load_folder(results), "b": []})
    assert summary.loc["a", "records"] == 2 and summary.loc["b", "scale"] == report.NO_RECORDS


def test_overhead_table_and_figure() -> None:
    benchmark = {
        "scale": "cpu (2 cores)",
        "runs": [{"label": "quiet", "step_s": {"none": 2.0, "so-fast": 2.1},
                  "step_median_ratio_vs_none": {"so-fast": 1.05}, "or_only_s": {"so-fast": 0.1, "so-naive": 0.3},
                  "additive_ratio_vs_none": {"so-fast": 1.05, "so-naive": 1.15}}],
    }
    table = report.overhead_table(benchmark)
    assert table.index.tolist() == [("quiet", "none"), ("quiet", "so-fast"), ("quiet", "so-naive")]
    assert table.loc[("quiet", "none"), "step / none (median)"] == 1.0
    assert table.loc[("quiet", "so-fast"), "OR term alone (s)"] == 0.1
    assert math.isnan(table.loc[("quiet", "so-naive"), "step_s"])
    fig = plots.overhead_figure(benchmark)
    assert "cpu (2 cores)" in fig.axes[0].get_title()
    assert report.overhead_table({}).empty
    plots.overhead_figure({})  # no benchmark yet: an empty panel, no error


def test_claims_summary_states_each_verdict_with_its_intervals(frame: pd.DataFrame, records: list[dict[str, Any]]) -> None:
    table = report.claims(frame, records)
    text = report.claims_summary(table)
    lines = {line.split("**")[1]: line for line in text.splitlines() if line.startswith("* **")}
    # only BYOL/CIFAR-10/SO has several seeds; the norm-only control has no run in these records
    assert set(lines) == {"No detectable effect", "Too few seeds", "No data yet"}
    assert lines["No data yet"].split(": ", 1)[1].rstrip(".") == table.loc[["norm_control"], "claim"].iloc[0]
    byol = table.loc["accuracy_so"].set_index("comparison").loc["BYOL / CIFAR-10 / SO (gamma 1e-6)"]
    assert (f"OR (SO) improves linear accuracy across methods and data sets (BYOL / CIFAR-10 / SO (gamma 1e-6): "
            f"+0.006667, 95% CI {byol['95% CI']}, 3 seeds; 2 other comparisons with too few seeds)") in lines["No detectable effect"]
    assert "OR (SRIP) improves linear accuracy across methods and data sets (2 comparisons)" in lines["Too few seeds"]
    overview = report.claim_lines(table)
    for key, claim in overview.iterrows():  # every claim is under each verdict it got, and only there
        for verdict_name in report.stats.VERDICTS:
            heading = lines.get(verdict_name.capitalize(), "")
            assert (claim["claim"] in heading) == (claim[verdict_name] > 0), (key, verdict_name)
    assert report.VERDICT_RULE in text
    empty = report.claims_summary(report.claims(report.records_frame([]), []))
    assert "No data yet" in empty and "Supported" not in empty


def test_tables_and_figures_import_nothing_of_training() -> None:
    """Reading records and making tables loads neither the training code nor matplotlib; the
    figures add matplotlib, still without the training code (a fresh interpreter: this
    process has imported everything already). ``or_core.augment`` is not among them: the method
    registry, which checking a matrix's configs loads, declares its views with augment's
    ``ViewConfig``."""
    script = """
import json, sys
from or_core import matrix, records, report, run_dirs, stats
loaded = lambda names: [n for n in names if n in sys.modules]
training = ["or_core.train", "or_core.training_run", "or_core.experiments", "or_core.data",
            "or_core.evaluate", "or_core.measure", "or_core.optim", "or_core.campaign"]
before = loaded(training + ["matplotlib"])
recs = report.load_folder("results/matrix_ci")
frame = report.records_frame(recs)
tables = [report.accuracy_table(frame), report.claims(frame, recs), report.missing_runs("configs/matrix_ci.yaml"),
          run_dirs.run_dirs_table(run_dirs.load_run_dirs("results/gpu_runs"))]
after_tables = loaded(training + ["matplotlib"])
from or_core import plots
plots.figure2(recs)
print(json.dumps({"records": len(recs), "rows": [len(t) for t in tables], "before": before,
                  "after_tables": after_tables, "after_figures": loaded(training), "matplotlib": "matplotlib" in sys.modules}))
"""
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["records"] > 0 and all(n > 0 for n in found["rows"][:2])
    assert found["before"] == [] and found["after_tables"] == [] and found["after_figures"] == []
    assert found["matplotlib"]


def test_claims_markdown_writes_accuracy_in_points_and_names_the_other_measures() -> None:
    """A kNN effect of -0.004533 with interval [-0.03922, +0.03015] reads -0.5 pt [-3.9, +3.0] pt;
    an SO-error effect keeps its value and says what it measures."""
    columns = list(report.HEADLINE_COLUMNS)
    rows = [["OR improves kNN", "cpu", "BYOL / CIFAR-10 / SO", -0.004533, "[-0.03922, +0.03015]", 3,
             "no detectable effect", "1 of 1", -0.03922, 0.03015],
            ["OR keeps weights orthogonal", "cpu", "BYOL / CIFAR-10 / SO", -2.426, "[-20.62, +15.77]", 3,
             "no detectable effect", "1 of 1", -20.62, 15.77]]
    table = pd.DataFrame(rows, columns=columns, index=["accuracy_knn", "orthogonality"])
    knn, orth = report.claims_markdown(table, sections={}).splitlines()[2:]
    assert "| -0.5 pt | [-3.9, +3.0] pt | 3 |" in knn
    assert "| -2.426 (SO error) | [-20.62, +15.77] | 3 |" in orth


def test_claims_markdown_names_the_scale_only_when_the_rows_have_several() -> None:
    columns = ["claim", "scale", "comparison", "effect", "95% CI", "seeds", "verdict", "comparisons"]
    row = ["OR works", "cpu-small", "BYOL / CIFAR-10 / SO", 0.01, "[-0.01, +0.03]", 3, "no detectable effect", "1 of 2"]
    one = pd.DataFrame([row], columns=columns, index=["so_linear"])
    header = report.claims_markdown(one, sections={}).splitlines()[0]
    assert "scale" not in header and header.count("|") == 8
    assert "BYOL / CIFAR-10 / SO (1 of 2 comparisons with >= 2 seeds)" in report.claims_markdown(one, sections={})
    two = pd.concat([one, pd.DataFrame([[*row[:1], "paper-scale", *row[2:]]], columns=columns, index=["so_knn"])])
    lines = report.claims_markdown(two, sections={}).splitlines()
    assert lines[0].split("|")[2].strip() == "scale" and "| paper-scale |" in lines[3]


def test_record_link_links_a_repository_file_and_hides_the_builders_home(tmp_path: Path) -> None:
    """A record in the repository becomes a link to it on GitHub; one a build wrote under the
    home folder is shown from ``~``, without the machine's home path; any other stays as given."""
    repo = Path(report.__file__).resolve().parents[1]
    assert report.record_link(repo / "results" / "x.json") == f"[results/x.json]({report.REPOSITORY_URL}/results/x.json)"
    home = Path.home() / ".cache" / "or_core" / "book-records" / "notebooks" / "01.json"
    assert report.record_link(home) == "`~/.cache/or_core/book-records/notebooks/01.json`"
    elsewhere = Path("/nonexistent-root-for-a-test/01.json")
    assert report.record_link(elsewhere) == f"`{elsewhere}`"


def test_the_norm_control_claim_pairs_so_with_its_diagonal_part_by_seed() -> None:
    """Our control claim on a known answer: copies of the recorded BYOL + SO runs relabelled as
    SO diagonal with kNN lowered by 0.010 + 0.001 * seed give, per seed, SO - SO diagonal =
    0.010 + 0.001 * seed, hence the mean 0.010 + 0.001 * mean(seeds) and a narrow interval
    above 0 (supported); without SO diagonal runs the claim has no data."""
    import copy

    records = [r for r in report.load_folder(Path(report.__file__).resolve().parents[1] / "results" / "matrix_cpu_paired")
               if "selection" not in r["groups"] and r["config"]["method"] == "byol"]
    so = [r for r in records if r["config"]["regularizer"] == "so"]
    if len(so) < 2:
        pytest.skip("fewer than two recorded BYOL + SO comparison runs")
    table = report.claims(report.records_frame(records), records)
    assert table.loc[["norm_control"], "verdict"].tolist() == [report.NO_DATA]
    diag = []
    for record in so:
        copy_ = copy.deepcopy(record)
        copy_["config"]["regularizer"] = copy_["summary"]["regularizer"] = "so_diag"
        copy_["name"] = record["name"].replace("-so-", "-so_diag-")
        copy_["summary"]["knn_top1"] -= 0.010 + 0.001 * record["config"]["seed"]
        diag.append(copy_)
    rows = report.claims(report.records_frame(records + diag), records + diag).loc[["norm_control"]]
    row = rows[rows["comparison"] != report.ALL_COMPARISONS].iloc[0]
    seeds = [r["config"]["seed"] for r in so]
    assert row["comparison"] == "(BYOL + SO) - (BYOL + SO diagonal) / CIFAR-10" and row["seeds"] == len(so)
    assert row["effect"] == pytest.approx(0.010 + 0.001 * np.mean(seeds), abs=1e-9)
    assert row["verdict"] == "supported" and 0 < row["ci_low"] < row["effect"] < row["ci_high"]
