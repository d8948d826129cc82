"""Tables, the data of figures, and claim checks made from result records (``results/**/*.json``).

Every table of notebooks 03 and 05 comes from here, and what each of their figures draws
(:mod:`or_core.plots` draws it); the notebooks only call these functions. Nothing here imports
matplotlib or the training code: records are read and turned into tables. Each record is one
run of an experiment matrix (:mod:`or_core.experiments`): its config, summary numbers, collapse
spectra, transfer probes and the scale it was made at.

* :func:`load_folder`, :func:`matrix_records`: records from disk; :func:`records_frame`: one
  row per run, with spectral flatness measures derived from the stored spectra;
* :func:`accuracy_table`, :func:`gamma_table`, :func:`table1`, :func:`paired_seeds`,
  :func:`paired_summary`, :func:`transfer_table`, :func:`overhead_table`,
  :func:`matrix_runs`, :func:`missing_runs`, :func:`folders_summary`: tables (shown with
  :func:`styled`);
* :func:`gamma_response_panels`, :func:`spectra_panels`, :func:`figure2_panels`,
  :func:`spectra_fallback`, :func:`stage_spectra_title`, :func:`overhead_times`: what the
  figures of :mod:`or_core.plots` draw (``plots.gamma_response``, ``plots.figure2``, ...), each
  titled with the scale of its records;
* :func:`claims`: the paper's claims, each per comparison (runs that share method, data set
  and regularizer, paired by seed) with the mean paired difference, its 95% interval and a
  verdict computed from them (:mod:`or_core.stats`, never typed in); :func:`claim_lines`,
  :func:`claims_summary`: the same per claim, and in words.

Example (from the repository root)::

    from or_core import plots, report

    records = report.load_folder("results/matrix_cpu")
    frame = report.records_frame(records)
    report.accuracy_table(frame)
    report.claims(frame, records)[list(report.CLAIM_COLUMNS)]
    fig = plots.figure2(records)

A matrix that is only partly recorded is fine everywhere: a missing run leaves a gap (``NaN``),
an empty panel says "no data yet", and a claim without numbers gets the verdict "no data yet".
Where several seeds of a run are recorded, the figures draw their mean with a band from the
smallest to the largest value over the seeds, and say so.

When several records could stand for one (method, data set, regularizer, seed), for example
the runs of the gamma grid, :func:`select_runs` takes the run whose gamma was chosen on the
validation split; without a choice, the paper-grid run with the best validation kNN.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from or_core import stats
from or_core.matrix import load_matrix, pending_runs
from or_core.records import load_record, load_records

__all__ = [
    "METRICS",
    "METHOD_LABELS",
    "method_label",
    "COMPARED_REGULARIZERS",
    "SUPPORTED",
    "NO_EFFECT",
    "CONTRADICTED",
    "TOO_FEW",
    "NOT_MEASURED",
    "NO_DATA",
    "NO_RECORDS",
    "COLUMNS",
    "spectrum_effective_rank",
    "hidden_stages",
    "records_frame",
    "scale_label",
    "select_runs",
    "accuracy_table",
    "gamma_table",
    "gamma_response_panels",
    "table1",
    "paired_seeds",
    "paired_summary",
    "paired_differences",
    "REGULARIZER_LABELS",
    "paired_values",
    "paired_effects",
    "transfer_table",
    "figure2_runs",
    "figure3_runs",
    "spectra_panels",
    "figure2_panels",
    "spectra_fallback",
    "stage_spectra_title",
    "SEED_BANDS",
    "verdict",
    "VERDICT_RULE",
    "ALL_COMPARISONS",
    "CLAIM_COLUMNS",
    "claims",
    "claims_view",
    "claim_counts",
    "claim_lines",
    "claims_summary",
    "styled",
    "INTEGER_COLUMNS",
    "TABLES_ENV",
    "LONG_TABLE_ROWS",
    "TableView",
    "show",
    "CLAIM_SECTIONS",
    "HEADLINE_COLUMNS",
    "headline_claims",
    "claims_markdown",
    "against_paper",
    "published_baselines",
    "baselines_table",
    "record_link",
    "missing_runs",
    "matrix_runs",
    "folders_summary",
    "load_folder",
    "matrix_records",
    "overhead_table",
    "overhead_times",
]

#: The accuracy numbers of a record's summary: kNN and linear probe, top-1 and top-5.
METRICS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")
#: The regularizers the report compares, the baseline first (a subset of
#: :data:`or_core.methods.REGULARIZERS`, every value of the ``regularizer`` switch).
COMPARED_REGULARIZERS = ("none", "so", "srip")
#: Verdicts of a comparison in :func:`claims` (:mod:`or_core.stats`); "no data yet": no pair of runs.
SUPPORTED, NO_EFFECT, CONTRADICTED, TOO_FEW = stats.SUPPORTED, stats.NO_EFFECT, stats.CONTRADICTED, stats.TOO_FEW
NO_DATA = "no data yet"
#: The scale label of an empty set of records.
NO_RECORDS = "no records yet"

#: The columns of :func:`records_frame` (an empty frame has them too).
COLUMNS = (
    "name", "scale", "matrix", "method", "dataset", "regularizer", "gamma", "gamma_chosen", "seed",
    "outside_paper_grid", "groups", *METRICS, "val_knn_top1", "effective_rank", "rankme", "or_so_total",
    "weight_flatness", "hidden_flatness", "representation_flatness", "width", "epochs", "train_images",
    "wall_time_s", "images_per_s", "device",
)
_RUN_KEYS = ["scale", "method", "dataset", "regularizer", "seed"]
#: How the book writes each method, in every figure and table (never ``byol`` in one and
#: ``BYOL`` in the next).
METHOD_LABELS = {
    "barlowtwins": "Barlow Twins", "byol": "BYOL", "byol_whitening": "BYOL + whitening", "dino": "DINO",
    "mocov2": "MoCo v2", "nnclr": "NNCLR", "simclr": "SimCLR", "simsiam": "SimSiam", "swav": "SwaV",
    "vicreg": "VICReg", "mocov3": "MoCo v3", "nnbyol": "NNBYOL", "nnsiam": "NNSiam", "ressl": "ReSSL",
    "wmse": "W-MSE", "vibcreg": "VIbCReg", "all4one": "All4One", "deepclusterv2": "DeepCluster V2",
}


def method_label(method: str) -> str:
    """The book's name of a method (:data:`METHOD_LABELS`): ``"byol"`` -> ``"BYOL"``; an
    unknown name is returned as it is."""
    return METHOD_LABELS.get(method, method)

_LABELS = {"none": "none", "so": "SO", "srip": "SRIP"}
_DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def dataset_label(dataset: str) -> str:
    """The book's name of a data set: ``"cifar10"`` -> ``"CIFAR-10"``; others as they are."""
    return _DATASET_LABELS.get(dataset, dataset)
_METRIC_NAMES = {
    "val_knn_top1": "validation kNN top-1 (held-out training images)",
    "knn_top1": "test kNN top-1",
    "linear_top1": "test linear top-1",
}


# ----------------------------------------------------------------------------------------------
# Records as a frame
# ----------------------------------------------------------------------------------------------
def spectrum_effective_rank(eigenvalues: Sequence[float]) -> float:
    """Roy & Vetterli's effective rank from covariance or Gram eigenvalues.

    The eigenvalues are squared singular values, so ``p_i = sqrt(l_i) / sum_j sqrt(l_j)`` and
    ``erank = exp(-sum p_i log p_i)``, the same measure as
    :func:`or_core.diagnostics.effective_rank` on the data matrix. Scaling does not change it,
    so the normalized spectra of a record serve. ``NaN`` for an empty or all-zero spectrum.
    """
    s = np.sqrt(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))
    if s.size == 0 or s.sum() <= 0:
        return math.nan
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _flatness(spectra: Sequence[Sequence[float]]) -> float:
    """Mean over spectra of effective rank / length: 1 for flat spectra, near 0 for collapse."""
    values = [spectrum_effective_rank(s) / len(s) for s in spectra if len(s)]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def hidden_stages(hidden: Mapping[str, Sequence[float]]) -> dict[str, Sequence[float]]:
    """The hidden-feature spectra of a record without its last stage.

    A record's ``collapse["hidden"]`` holds the pooled output of every stage
    (:func:`or_core.measure.collapse_spectra`: a ResNet's layer1 ... layer4). The pooled output
    of the last stage is the encoder's output, so its spectrum is the representation's (the
    records store it twice); a hidden-feature measure that kept it would count the
    representation again. ``{}`` when the record has one stage or none.
    """
    names = list(hidden)
    return {name: hidden[name] for name in names[:-1]}


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    cfg, summary = record["config"], record["summary"]
    collapse = record.get("collapse") or {}
    gamma = summary.get("gamma", cfg.get("gamma"))
    regularizer = cfg.get("regularizer", "none")
    row = {
        "name": record.get("name"),
        "scale": record.get("scale", "custom"),
        "matrix": record.get("matrix"),
        "method": cfg.get("method"),
        "dataset": Path(str(cfg.get("dataset"))).name,
        "regularizer": regularizer,
        "gamma": float(gamma) if gamma is not None and regularizer != "none" else math.nan,
        "gamma_chosen": record.get("gamma_choice") is not None,
        "seed": int(cfg.get("seed", 0)),
        "outside_paper_grid": bool(record.get("outside_paper_grid", False)),
        "groups": ", ".join(record.get("groups") or []),
        "weight_flatness": _flatness(list((collapse.get("weights") or {}).values())),
        "hidden_flatness": _flatness(list(hidden_stages(collapse.get("hidden") or {}).values())),
        "representation_flatness": _flatness([collapse.get("representation") or []]),
        "width": cfg.get("width"),
        "epochs": cfg.get("epochs"),
    }
    for key in (*METRICS, "val_knn_top1", "effective_rank", "rankme", "or_so_total", "train_images",
                "wall_time_s", "images_per_s", "device"):
        value = summary.get(key)
        row[key] = math.nan if value is None and key != "device" else value
    return row


def records_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run record, the columns of :data:`COLUMNS`, sorted by scale and name.

    Besides the summary's numbers, three measures of the stored collapse spectra, each the
    effective rank divided by the spectrum's length (1: flat, near 0: collapsed), averaged:
    ``weight_flatness`` over the regularized weights (their Gram spectra),
    ``hidden_flatness`` over the pooled outputs of the stages before the last
    (:func:`hidden_stages`: a ResNet's layer1-3, since the pooled layer4 is the representation;
    ``NaN`` when a record holds no such stage), ``representation_flatness`` of the encoder's
    output. Objects that are not run records (no ``config``/``summary``, e.g. a
    benchmark) are left out.
    """
    rows = [_row(r) for r in records if isinstance(r.get("config"), dict) and isinstance(r.get("summary"), dict)]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.sort_values(["scale", "name"], ignore_index=True) if len(frame) else frame


def scale_label(frame_or_records: pd.DataFrame | Sequence[Mapping[str, Any]]) -> str:
    """The scales of some records, for a title: ``"cpu-small"``, ``"cpu-ci + cpu-small"`` or
    ``"no records yet"``."""
    if isinstance(frame_or_records, pd.DataFrame):
        scales = frame_or_records["scale"].dropna().unique().tolist() if "scale" in frame_or_records else []
    else:
        scales = [r.get("scale", "custom") for r in frame_or_records]
    unique = sorted(set(scales))
    return " + ".join(unique) if unique else NO_RECORDS


def _scale_tag(records: pd.DataFrame | Sequence[Mapping[str, Any]]) -> str:
    """``"[cpu-small records]"``, or ``"[no records yet]"``: the end of every title."""
    label = scale_label(records)
    return f"[{label}]" if label == NO_RECORDS else f"[{label} records]"


#: What a figure's line and band are where a run has several seeds (added to its title).
SEED_BANDS = "lines: mean over a run's seeds, bands: min to max over them"

#: Runs of a figure: ``{label: record}``, or ``{label: [record of each seed]}``.
Runs = Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]]


def _seed_groups(runs: Runs) -> dict[str, list[Mapping[str, Any]]]:
    """``{label: [records]}``: the seeds of each run (one record stands for one seed)."""
    return {label: [group] if isinstance(group, Mapping) else list(group) for label, group in runs.items()}


def _titled(title: str, runs: Runs) -> str:
    """``title`` ending with the runs' scale tag (added when it is not there yet), after a line
    saying what the lines and bands are when a run has several seeds (:data:`SEED_BANDS`)."""
    groups = _seed_groups(runs)
    tag = _scale_tag([r for group in groups.values() for r in group])
    if title.endswith(tag):
        return title
    several = any(len(group) > 1 for group in groups.values())
    note = f"\n({SEED_BANDS})" if several and SEED_BANDS not in title else ""
    return f"{title}{note} {tag}"


def _backbone_text(runs: Runs) -> str:
    """``"ResNet-18, width 0.125"`` from the runs' configs (``"ResNet-18"`` at full width)."""
    records = [r for group in _seed_groups(runs).values() for r in group]
    widths = sorted({float(r.get("config", {}).get("width", 1.0)) for r in records})
    names = sorted({str(r.get("config", {}).get("backbone", "resnet18")) for r in records}) or ["resnet18"]
    name = ", ".join(n.replace("resnet", "ResNet-") for n in names)
    return name if widths in ([], [1.0]) else f"{name}, width {', '.join(f'{w:g}' for w in widths)}"


def gamma_text(gamma: float) -> str:
    """``1e-6`` rather than ``1e-06``."""
    return f"{gamma:.0e}".replace("e-0", "e-").replace("e+0", "e")


def select_runs(frame: pd.DataFrame, seed: int | None = 0) -> pd.DataFrame:
    """One run per (scale, method, data set, regularizer, seed), inside the paper's grid.

    Among several candidates (the gamma grid), the run whose gamma was chosen on the validation
    split wins; without a choice, the best ``val_knn_top1`` (what the choice would take), then
    the name. ``seed=None`` keeps every seed.
    """
    runs = frame[~frame["outside_paper_grid"].astype(bool)]
    if seed is not None:
        runs = runs[runs["seed"] == seed]
    if runs.empty:
        return runs.copy()
    ranked = runs.assign(_val=runs["val_knn_top1"].fillna(-np.inf)).sort_values(
        ["gamma_chosen", "_val", "name"], ascending=[False, False, True]
    )
    return ranked.drop_duplicates(_RUN_KEYS).drop(columns="_val").sort_values(_RUN_KEYS, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def accuracy_table(
    frame: pd.DataFrame, metrics: Sequence[str] = ("knn_top1", "linear_top1"), seed: int = 0
) -> pd.DataFrame:
    """Methods x data sets (rows) against none / SO / SRIP (columns), per metric, with the
    differences ``SO - none`` and ``SRIP - none`` and the gammas used (Tables 2 and 4 of the
    paper). Runs from :func:`select_runs`; a run not recorded is ``NaN``."""
    runs = select_runs(frame, seed)
    columns = pd.MultiIndex.from_tuples(
        [(m, c) for m in metrics for c in (*COMPARED_REGULARIZERS, "SO - none", "SRIP - none")]
        + [("gamma", "so"), ("gamma", "srip")]
    )
    if runs.empty:
        return pd.DataFrame(columns=columns, index=pd.MultiIndex.from_tuples([], names=["method", "dataset"]))
    keys = ["method", "dataset"] + (["scale"] if runs["scale"].nunique() > 1 else [])
    runs = runs[runs["method"] != "byol_whitening"]
    table = pd.DataFrame(index=pd.MultiIndex.from_frame(runs[keys].drop_duplicates()), columns=columns, dtype=float)
    for metric in [*metrics, "gamma"]:
        wide = runs.pivot_table(index=keys, columns="regularizer", values=metric, aggfunc="first")
        for reg in COMPARED_REGULARIZERS:
            if (metric, reg) in table.columns and reg in wide:
                table[(metric, reg)] = wide[reg]
        if metric != "gamma":
            for reg in ("so", "srip"):
                table[(metric, f"{_LABELS[reg]} - none")] = table[(metric, reg)] - table[(metric, "none")]
    return table.sort_index()


def gamma_table(frame: pd.DataFrame, method: str = "byol", dataset: str = "cifar10", seed: int = 0) -> pd.DataFrame:
    """Every gamma of one method and data set (seed 0): validation and test kNN, linear top-1,
    whether the gamma lies outside the paper's grid or was chosen, and the kNN difference to
    the run without OR (the dose-response of the gamma grid)."""
    runs = frame[(frame["method"] == method) & (frame["dataset"] == dataset) & (frame["seed"] == seed)]
    base = runs[runs["regularizer"] == "none"]
    out = runs[runs["regularizer"] != "none"].sort_values(["regularizer", "gamma"])
    cols = ["regularizer", "gamma", "outside_paper_grid", "gamma_chosen", "val_knn_top1", "knn_top1", "linear_top1"]
    table = out[cols].reset_index(drop=True)
    none_knn = float(base["knn_top1"].iloc[0]) if len(base) else math.nan
    table["knn_top1 - none"] = table["knn_top1"] - none_knn
    return table


def table1(frame: pd.DataFrame, dataset: str = "cifar10", seed: int = 0) -> pd.DataFrame:
    """Table 1 analogue: BYOL, BYOL + feature whitening (VICReg's, on the representation),
    BYOL + SO and BYOL + SRIP on one data set; accuracies, effective rank of the
    representation, final orthogonality error and spectral flatness. Missing runs are ``NaN``."""
    runs = select_runs(frame[frame["dataset"] == dataset], seed)
    wanted = {
        "BYOL": ("byol", "none"),
        "BYOL + feature whitening": ("byol_whitening", "none"),
        "BYOL + SO": ("byol", "so"),
        "BYOL + SRIP": ("byol", "srip"),
    }
    cols = ["name", "gamma", *METRICS, "effective_rank", "or_so_total", "weight_flatness", "hidden_flatness"]
    rows = {}
    for label, (method, reg) in wanted.items():
        match = runs[(runs["method"] == method) & (runs["regularizer"] == reg)]
        rows[label] = match[cols].iloc[0] if len(match) else pd.Series(index=cols, dtype=object)
    table = pd.DataFrame(rows).T
    table.index.name = "run"
    numeric = [c for c in cols if c != "name"]
    table[numeric] = table[numeric].astype(float)
    return table


def paired_seeds(
    frame: pd.DataFrame,
    method: str = "byol",
    dataset: str = "cifar10",
    regularizer: str = "so",
    metrics: Sequence[str] = ("knn_top1", "linear_top1"),
) -> pd.DataFrame:
    """Per seed, the run without OR against the run with ``regularizer`` (same seed: same
    subset and initialization): each metric for both and their difference. Seeds with only one
    of the two runs are left out."""
    runs = select_runs(frame[(frame["method"] == method) & (frame["dataset"] == dataset)], seed=None)
    base = runs[runs["regularizer"] == "none"].set_index("seed")
    other = runs[runs["regularizer"] == regularizer].set_index("seed")
    seeds = sorted(set(base.index) & set(other.index))
    label = _LABELS.get(regularizer, regularizer)
    columns = pd.MultiIndex.from_tuples([(m, c) for m in metrics for c in ("none", label, f"{label} - none")])
    table = pd.DataFrame(index=pd.Index(seeds, name="seed"), columns=columns, dtype=float)
    for metric in metrics:
        table[(metric, "none")] = base.loc[seeds, metric].astype(float)
        table[(metric, label)] = other.loc[seeds, metric].astype(float)
        table[(metric, f"{label} - none")] = table[(metric, label)] - table[(metric, "none")]
    return table


def paired_summary(paired: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (``ddof=1``) over seeds of each column of
    :func:`paired_seeds`, and per metric the number of seeds where the regularized run wins
    (difference > 0)."""
    rows = []
    for metric in dict.fromkeys(paired.columns.get_level_values(0)):
        cols = paired[metric]
        diff = cols.iloc[:, 2]
        row: dict[str, Any] = {"metric": metric, "seeds": len(cols)}
        for col in cols.columns:
            row[f"{col} mean"] = cols[col].mean()
            row[f"{col} std"] = cols[col].std(ddof=1)
        row["wins"] = int((diff > 0).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("metric") if rows else pd.DataFrame()


def paired_differences(
    frame: pd.DataFrame, measure: str, regularizers: Sequence[str] = ("so", "srip"), seed: int | None = None,
    dropna: bool = True,
) -> pd.DataFrame:
    """Every run with OR against the run without OR of the same method, data set and seed:
    ``measure`` of both and ``delta = with OR - without``. Pairs where either run lacks the
    measure are left out, unless ``dropna`` is false (their ``delta`` is ``NaN``)."""
    runs = select_runs(frame, seed)
    base = runs[runs["regularizer"] == "none"]
    keys = ["scale", "method", "dataset", "seed"]
    pairs = runs[runs["regularizer"].isin(regularizers)].merge(base[[*keys, measure]], on=keys, suffixes=("", "_none"))
    table = pairs[[*keys, "regularizer", "gamma"]].copy()
    table["without OR"] = pairs[f"{measure}_none"].astype(float)
    table["with OR"] = pairs[measure].astype(float)
    table["delta"] = table["with OR"] - table["without OR"]
    return (table.dropna(subset=["delta"]) if dropna else table).reset_index(drop=True)


#: How the book writes each regularizer in the paired figures and tables.
REGULARIZER_LABELS = {
    "none": "none", "so": "SO", "srip": "SRIP", "so_diag": "SO diagonal", "so_offdiag": "SO off-diagonal",
    "dso": "DSO", "mc": "MC",
}


def paired_values(frame: pd.DataFrame, method: str = "byol", dataset: str = "cifar10",
                  metric: str = "knn_top1") -> pd.DataFrame:
    """``metric`` of every run of ``method`` on ``dataset``, one row per seed and one column per
    regularizer (``none`` first, then :data:`REGULARIZER_LABELS`' order), the runs
    :func:`select_runs` keeps (every seed). A seed without some arm has ``NaN`` there."""
    runs = select_runs(frame[(frame["method"] == method) & (frame["dataset"] == dataset)], seed=None)
    if runs.empty:
        return pd.DataFrame(index=pd.Index([], name="seed"))
    table = runs.pivot_table(index="seed", columns="regularizer", values=metric, aggfunc="first")
    order = [r for r in REGULARIZER_LABELS if r in table.columns]
    order += sorted(c for c in table.columns if c not in order)
    table = table[order].astype(float)
    table.columns.name = None
    return table


def paired_effects(values: pd.DataFrame) -> pd.DataFrame:
    """Each regularizer's column of :func:`paired_values` against ``none`` on the seeds that have
    both: the number of pairs, the mean paired difference (with OR - without), its paired-t 95%
    interval and verdict (:func:`or_core.stats.paired_comparison`; fewer than two pairs: no
    interval, "too few seeds")."""
    rows = []
    for column in values.columns:
        if column == "none" or "none" not in values.columns:
            continue
        both = values[["none", column]].dropna()
        result = stats.paired_comparison(both[column] - both["none"])
        rows.append({
            "regularizer": column, "label": REGULARIZER_LABELS.get(column, column), "seeds": result.n,
            "effect": result.mean, "ci_low": result.low, "ci_high": result.high, "95% CI": _interval_text(result),
            "verdict": result.verdict,
        })
    columns = ["regularizer", "label", "seeds", "effect", "ci_low", "ci_high", "95% CI", "verdict"]
    return pd.DataFrame(rows, columns=columns)


def transfer_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Linear and kNN probes of frozen encoders on other data sets (Table 5 analogue): one row
    per (pretraining run, target data set)."""
    rows = []
    for record in records:
        for target, probe in (record.get("transfer") or {}).items():
            cfg = record.get("config", {})
            rows.append({
                "target": target, "scale": record.get("scale"), "name": record.get("name"),
                "method": cfg.get("method"), "pretrained on": Path(str(cfg.get("dataset"))).name,
                "regularizer": cfg.get("regularizer", "none"), "seed": cfg.get("seed", 0),
                "linear_top1": probe.get("linear_top1", math.nan), "linear_top5": probe.get("linear_top5", math.nan),
                "knn_top1": probe.get("knn_top1", math.nan),
            })
    columns = ["target", "scale", "name", "method", "pretrained on", "regularizer", "seed", "linear_top1",
               "linear_top5", "knn_top1"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["target", "regularizer", "seed", "name"], ignore_index=True) if len(table) else table


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def _over_seeds(runs: pd.DataFrame, keys: Sequence[str], metric: str) -> pd.DataFrame:
    """Per group of ``keys``: the mean, smallest and largest ``metric`` over its runs (seeds),
    their number, and whether any run lies outside the paper's grid or had its gamma chosen."""
    return runs.groupby(list(keys), sort=True).agg(
        mean=(metric, "mean"), low=(metric, "min"), high=(metric, "max"), seeds=(metric, "count"),
        outside=("outside_paper_grid", "any"), chosen=("gamma_chosen", "any"),
    ).reset_index()


def _seeds_text(n: int) -> str:
    """``" (mean of 3 seeds)"`` for a legend, ``""`` for one seed."""
    return f" (mean of {n} seeds)" if n > 1 else ""


def gamma_response_panels(
    frame: pd.DataFrame,
    method: str = "byol",
    dataset: str = "cifar10",
    metrics: Sequence[str] = ("val_knn_top1", "knn_top1"),
) -> tuple[list[dict[str, Any]], str]:
    """What :func:`or_core.plots.gamma_response` draws: one panel per metric (the arguments of
    :func:`or_core.plots.plot_dose_response`), and the figure's title.

    Each metric against gamma, one series per regularizer: per gamma the mean over the seeds
    recorded and the smallest and largest of them, whether the gamma lies outside the paper's
    grid, the gamma chosen on validation; the run without OR as a baseline (mean, min, max)."""
    runs = frame[(frame["method"] == method) & (frame["dataset"] == dataset)]
    base = runs[runs["regularizer"] == "none"]
    regularized = runs[runs["regularizer"] != "none"]
    several = False
    panels = []
    for metric in metrics:
        series, chosen, spread = {}, {}, {}
        for reg, part in _over_seeds(regularized, ["regularizer", "gamma"], metric).groupby("regularizer", sort=True):
            label = f"{method_label(method)} + {_LABELS.get(reg, reg)}"
            series[label] = (part["gamma"], part["mean"], part["outside"].tolist())
            spread[label] = (part["low"], part["high"])
            several |= bool((part["seeds"] > 1).any())
            if part["chosen"].any():
                chosen[label] = float(part.loc[part["chosen"], "gamma"].iloc[0])
        baselines, baseline_spread = {}, {}
        values = base[metric].dropna()
        if len(values):
            label = f"{method_label(method)} without OR{_seeds_text(len(values))}"
            baselines[label] = float(values.mean())
            baseline_spread[label] = (float(values.min()), float(values.max()))
            several |= len(values) > 1
        panels.append({
            "series": series, "title": _METRIC_NAMES.get(metric, metric), "baselines": baselines, "chosen": chosen,
            "spread": spread, "baseline_spread": baseline_spread, "xlabel": "gamma", "ylabel": metric,
        })
    bands = ("\n(points and dashed line: mean over the seeds recorded; bars and band: min to max over them)"
             if several else "")
    title = (f"{method_label(method)} on {_DATASET_LABELS.get(dataset, dataset)}: "
             f"accuracy against gamma {_scale_tag(runs)}\n"
             f"(filled: the paper's grid; hollow: outside it; ringed: chosen on validation){bands}")
    return panels, title


def _pick(frame: pd.DataFrame, records: Sequence[Mapping[str, Any]], wanted: Mapping[str, tuple[str, str]],
          dataset: str, seed: int | None) -> dict[str, list[Mapping[str, Any]]]:
    """``{label: [record of each seed]}`` of the selected (method, regularizer) runs on
    ``dataset`` (``seed=None``: every seed; one scale per run, the first)."""
    by_name = {(r.get("scale"), r.get("name")): r for r in records}
    runs = select_runs(frame[frame["dataset"] == dataset], seed)
    out = {}
    for label, (method, reg) in wanted.items():
        match = runs[(runs["method"] == method) & (runs["regularizer"] == reg)]
        if len(match):
            match = match[match["scale"] == match["scale"].iloc[0]]  # the seeds of one setup, not two scales
            gammas = sorted(set(match["gamma"].dropna()))
            gamma = f" (gamma {', '.join(gamma_text(g) for g in gammas)})" if reg != "none" and gammas else ""
            out[label + gamma + _seeds_text(len(match))] = [by_name[(row["scale"], row["name"])]
                                                              for _, row in match.sort_values("seed").iterrows()]
    return out


def figure2_runs(
    records: Sequence[Mapping[str, Any]], dataset: str = "cifar10", seed: int | None = None, include_srip: bool = False
) -> dict[str, list[Mapping[str, Any]]]:
    """The runs of Figure 2: BYOL, BYOL + feature whitening, BYOL + SO (and + SRIP), the ones
    recorded, each with every seed recorded (``seed``: only that one)."""
    wanted = {"BYOL": ("byol", "none"), "BYOL + whitening": ("byol_whitening", "none"), "BYOL + SO": ("byol", "so")}
    if include_srip:
        wanted["BYOL + SRIP"] = ("byol", "srip")
    return _pick(records_frame(records), records, wanted, dataset, seed)


def figure3_runs(
    records: Sequence[Mapping[str, Any]], method: str = "byol", dataset: str = "cifar10", seed: int | None = None
) -> dict[str, list[Mapping[str, Any]]]:
    """The runs of Figure 3: one method without OR, with SO and with SRIP, the ones recorded,
    each with every seed recorded (``seed``: only that one)."""
    name = method_label(method)
    wanted = {name: (method, "none"), f"{name} + SO": (method, "so"), f"{name} + SRIP": (method, "srip")}
    return _pick(records_frame(records), records, wanted, dataset, seed)


def _stage_last_convs(names: Sequence[str]) -> list[str]:
    """The last convolution of each ResNet stage (``layer1.1.conv2`` ...), else every name."""
    last = {}
    for name in names:
        stage = name.split(".")[0]
        if stage.startswith("layer") and "downsample" not in name:
            last[stage] = name
    return list(last.values()) or list(names)


def _seed_spectra(spectra: Sequence[Sequence[float]]) -> Sequence[float] | np.ndarray:
    """One run's spectra over its seeds, for :func:`or_core.plots.plot_spectra`: the spectrum
    of a single seed, or a ``(seeds, n)`` array (a mean line with a min-max band). Seeds whose
    spectrum is of another length than the first's (another width) are left out."""
    same = [list(x) for x in spectra if len(x) == len(spectra[0])]
    return same[0] if len(same) == 1 else np.asarray(same, dtype=np.float64)


def _panel(collapse: Mapping[str, Sequence[Mapping[str, Any]]], kind: str, layer: str | None = None) -> dict[str, Any]:
    """``{run label: spectra over its seeds}`` of one kind (and layer) of spectrum, for the runs
    whose records hold it."""
    panel = {}
    for label, seeds in collapse.items():
        found = [c.get(kind) if layer is None else (c.get(kind) or {}).get(layer) for c in seeds]
        found = [x for x in found if x]
        if found:
            panel[label] = _seed_spectra(found)
    return panel


def _collapse(runs: Runs) -> dict[str, list[Mapping[str, Any]]]:
    """``{run label: [collapse spectra of each seed]}``."""
    return {label: [r.get("collapse") or {} for r in group] for label, group in _seed_groups(runs).items()}


def _names(collapse: Mapping[str, Sequence[Mapping[str, Any]]], kind: str) -> list[str]:
    """The layers of one kind of spectrum that any record holds, in their order."""
    return list(dict.fromkeys(n for seeds in collapse.values() for c in seeds for n in (c.get(kind) or {})))


def spectra_panels(
    records: Sequence[Mapping[str, Any]],
    kind: str = "weights",
    runs: Runs | None = None,
    layers: Sequence[str] | None = None,
    title: str | None = None,
) -> tuple[dict[str, dict[str, Any]], str]:
    """What :func:`or_core.plots.spectra_figure` draws: ``{panel: {run label: spectra over
    its seeds}}`` of one kind of spectrum, and the title (with the records' scale).

    One line per run (default :func:`figure2_runs`). ``kind``: ``"weights"`` (Gram spectra; one
    panel per layer of ``layers``, default the last convolution of each stage), ``"hidden"``
    (covariance of each stage's pooled output; one panel per stage) or ``"representation"``
    (one panel). ``runs``: ``{label: record}`` or ``{label: [records of its seeds]}``.
    """
    if kind not in ("weights", "hidden", "representation"):
        raise ValueError(f"kind must be 'weights', 'hidden' or 'representation', got {kind!r}")
    runs = figure2_runs(records) if runs is None else runs
    collapse = _collapse(runs)
    if kind == "representation":
        panels = {"representation": _panel(collapse, "representation")}
    else:
        available = _names(collapse, kind)
        chosen = (list(layers) if layers is not None
                  else (_stage_last_convs(available) if kind == "weights" else available))
        panels = {layer: _panel(collapse, kind, layer) for layer in chosen}
    what = {"weights": "weight Gram", "hidden": "hidden-feature covariance",
            "representation": "representation covariance"}
    return panels, _titled(title or f"Eigenvalue spectra of {what[kind]} matrices", runs)


def figure2_panels(
    records: Sequence[Mapping[str, Any]],
    runs: Runs | None = None,
    weight_layer: str | None = None,
    hidden_layer: str | None = None,
    title: str | None = None,
) -> tuple[dict[str, dict[str, Any]], str]:
    """What :func:`or_core.plots.figure2` draws, three panels: a weight's Gram spectrum, a
    hidden stage's feature spectrum and the representation's, for BYOL, BYOL + whitening and
    BYOL + OR (default :func:`figure2_runs`), and the title.

    ``weight_layer`` defaults to the last convolution of the last stage (``layer4.1.conv2``),
    ``hidden_layer`` to the last stage but one (``layer3``), whose output is not the
    representation itself."""
    runs = figure2_runs(records) if runs is None else runs
    collapse = _collapse(runs)
    weights, stages = _names(collapse, "weights"), _names(collapse, "hidden")
    weight_layer = weight_layer or (_stage_last_convs(weights)[-1] if weights else "weights")
    hidden_layer = hidden_layer or (stages[-2] if len(stages) > 1 else stages[-1] if stages else "hidden")
    panels = {
        f"weights: {weight_layer}": _panel(collapse, "weights", weight_layer),
        f"hidden features: {hidden_layer}": _panel(collapse, "hidden", hidden_layer),
        "representation": _panel(collapse, "representation"),
    }
    return panels, _titled(title or f"Figure 2 analogue: BYOL on CIFAR-10, {_backbone_text(runs)}", runs)


def spectra_fallback(
    records: Sequence[Mapping[str, Any]], fallback: Sequence[Mapping[str, Any]], expected: str = "cpu-small"
) -> tuple[Sequence[Mapping[str, Any]], str | None]:
    """The records the README's Figure 2 is drawn from, and its title: ``records`` (title
    ``None``, the default) when they hold a run of :func:`figure2_runs`, else ``fallback``'s,
    with a title that says so."""
    if not figure2_runs(records) and figure2_runs(fallback):
        return fallback, (f"Figure 2 analogue, FALLBACK: no {expected} records yet, "
                          f"the {scale_label(fallback)} records instead")
    return records, None


def stage_spectra_title(runs: Runs, title: str | None = None) -> str:
    """The title of the Figure 3 analogue (:func:`or_core.plots.stage_spectra_figure`) of ``runs``."""
    return _titled(title or f"Figure 3 analogue: hidden features per stage, BYOL on CIFAR-10, {_backbone_text(runs)}",
                   runs)


# ----------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------
#: Verdicts of a comparison beyond those of :mod:`or_core.stats`: its runs are recorded but the
#: measure is not (e.g. no stage before the representation), or nothing is recorded at all.
NOT_MEASURED = "not measured"
#: The ``comparison`` of a claim's own line in :func:`claims`, below its comparisons.
ALL_COMPARISONS = "all comparisons"
#: The columns of :func:`claims` worth reading; the others hold the details.
CLAIM_COLUMNS = ("claim", "comparison", "effect", "95% CI", "seeds", "verdict")
#: The rule of every comparison's verdict, in words.
VERDICT_RULE = stats.RULE


def verdict(deltas: Sequence[float]) -> str:
    """The verdict of one comparison's signed paired differences (each > 0 when it agrees with
    the claim; ``NaN`` dropped): the paired-t 95% interval of their mean above 0 "supported",
    containing 0 "no detectable effect", below 0 "contradicted"
    (:func:`or_core.stats.paired_comparison`); one difference "too few seeds", none "no data yet"."""
    values = [float(d) for d in deltas if d is not None and not math.isnan(float(d))]
    return stats.paired_comparison(values).verdict if values else NO_DATA


def _signed(value: float) -> str:
    return f"{value:+.4g}"


def _interval_text(result: stats.PairedComparison) -> str:
    """``"[-0.0123, +0.0345]"``, or ``"-"`` without an interval (fewer than two seeds)."""
    return f"[{_signed(result.low)}, {_signed(result.high)}]" if result.has_interval else "-"


def _comparison_row(claim: Mapping[str, str], scale: str, label: str, seeds: Sequence[int],
                    deltas: Sequence[float]) -> dict[str, Any]:
    """One comparison of a claim: its paired differences summarized by
    :func:`or_core.stats.paired_comparison`. Pairs whose measure is missing count as no seed;
    when every pair lacks it, the verdict is "not measured"."""
    result = stats.paired_comparison(deltas)
    measured = [d for d in deltas if not math.isnan(d)]
    details = "; ".join(f"s{seed}: {'not measured' if math.isnan(d) else _signed(d)}" for seed, d in zip(seeds, deltas))
    return {
        **claim, "scale": scale, "comparison": label, "effect": result.mean, "95% CI": _interval_text(result),
        "seeds": result.n, "verdict": NOT_MEASURED if not measured else result.verdict,
        "ci_low": result.low, "ci_high": result.high, "differences": details,
        # the names of the sign-count table, still read by notebook 03
        "n": result.n, "positive": int(sum(d > 0 for d in measured)), "mean difference": result.mean,
    }


def claim_counts(rows: pd.DataFrame) -> dict[str, int]:
    """How many of a claim's comparison rows (of :func:`claims`, without its own line) got each
    verdict, and how many had at least two seeds (``"with an interval"``)."""
    verdicts = rows["verdict"].tolist()
    counts = {name: verdicts.count(name) for name in (*stats.VERDICTS, TOO_FEW, NOT_MEASURED)}
    counts["with an interval"] = sum(counts[name] for name in stats.VERDICTS)
    return counts


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _claim_line(counts: Mapping[str, int]) -> str:
    """The claim-level verdict: ``"of 1 comparison with >= 2 seeds: supported in 0, no
    detectable effect in 1, contradicted in 0; 6 comparisons with too few seeds"``."""
    n = counts["with an interval"]
    parts = [f"of {_plural(n, 'comparison')} with >= {stats.MIN_SEEDS} seeds: "
             + ", ".join(f"{name} in {counts[name]}" for name in stats.VERDICTS)
             if n else f"no comparison with >= {stats.MIN_SEEDS} seeds"]
    if counts[TOO_FEW]:
        parts.append(f"{_plural(counts[TOO_FEW], 'comparison')} with too few seeds")
    if counts[NOT_MEASURED]:
        parts.append(f"{_plural(counts[NOT_MEASURED], 'comparison')} not measured")
    return "; ".join(parts)


def _claim_rows(key: str, claim: str, source: str, measure: str, pairs: pd.DataFrame) -> list[dict[str, Any]]:
    """A claim's rows: one per comparison of ``pairs`` (columns ``scale``, ``comparison``,
    ``suffix``, ``gamma``, ``seed``, ``delta``, the delta signed so that > 0 agrees with the
    claim; the comparison is named ``comparison (gamma ...)suffix``), then
    the claim's own line (:data:`ALL_COMPARISONS`); only that line, "no data yet", without pairs."""
    head = {"id": key, "claim": claim, "paper": source, "measure (difference > 0 agrees)": measure}
    several_scales = pairs["scale"].nunique() > 1
    rows = []
    for (scale, label, suffix), part in pairs.groupby(["scale", "comparison", "suffix"], sort=True):
        part = part.sort_values("seed")
        gammas = sorted({float(g) for g in part["gamma"] if not pd.isna(g)})
        name = label + (f" (gamma {', '.join(gamma_text(g) for g in gammas)})" if gammas else "") + suffix
        name = f"[{scale}] {name}" if several_scales else name
        rows.append(_comparison_row(head, str(scale), name, part["seed"].astype(int).tolist(),
                                    part["delta"].astype(float).tolist()))
    counts = claim_counts(pd.DataFrame(rows, columns=["verdict"])) if rows else None
    scale = ", ".join(sorted({str(s) for s in pairs["scale"]})) or NO_RECORDS
    rows.append({**head, "scale": scale, "comparison": ALL_COMPARISONS, "effect": math.nan, "95% CI": "",
                 "seeds": sum(r["seeds"] for r in rows), "verdict": _claim_line(counts) if counts else NO_DATA,
                 "ci_low": math.nan, "ci_high": math.nan, "differences": "", "n": sum(r["n"] for r in rows),
                 "positive": sum(r["positive"] for r in rows), "mean difference": math.nan})
    return rows


def _pairs(table: pd.DataFrame, label: pd.Series, delta: pd.Series, suffix: pd.Series | str = "") -> pd.DataFrame:
    """The columns :func:`_claim_rows` reads, from a table of paired runs (``suffix``: written
    after the gamma, e.g. a transfer target)."""
    return pd.DataFrame({"scale": table["scale"], "comparison": label, "suffix": suffix,
                         "gamma": table.get("gamma", math.nan), "seed": table["seed"], "delta": delta.astype(float)})


_PAIR_COLUMNS = ["scale", "comparison", "suffix", "gamma", "seed", "delta"]


def _or_pairs(frame: pd.DataFrame, column: str, regularizers: Sequence[str], sign: float) -> pd.DataFrame:
    """Runs with OR against the run without OR of the same method, data set and seed (every
    seed): one comparison per (method, data set, regularizer)."""
    table = paired_differences(frame, column, regularizers, seed=None, dropna=False)
    label = (table["method"].map(method_label) + " / " + table["dataset"].map(dataset_label) + " / "
             + table["regularizer"].map(lambda r: _LABELS.get(r, r)))
    return _pairs(table, label, sign * table["delta"]) if len(table) else pd.DataFrame(columns=_PAIR_COLUMNS)


def _or_claim(key: str, frame: pd.DataFrame, claim: str, source: str, measure: str, column: str,
              sign: float = 1.0, regularizers: Sequence[str] = ("so", "srip")) -> list[dict[str, Any]]:
    """A claim about OR, per comparison (method, data set, regularizer) over the paired seeds."""
    return _claim_rows(key, claim, source, measure, _or_pairs(frame, column, regularizers, sign))


def _method_pairs(frame: pd.DataFrame, column: str, first: tuple[str, str], second: tuple[str, str],
                  what: str = "") -> pd.DataFrame:
    """``column`` of the runs ``first`` = (method, regularizer) minus those of ``second``, paired by
    scale, data set and seed; one comparison per data set."""
    runs = select_runs(frame, seed=None)
    keys = ["scale", "dataset", "seed"]

    def part(method: str, regularizer: str) -> pd.DataFrame:
        return runs[(runs["method"] == method) & (runs["regularizer"] == regularizer)][[*keys, column]]

    table = part(*first).merge(part(*second), on=keys, suffixes=("", "_other"))
    if table.empty:
        return pd.DataFrame(columns=_PAIR_COLUMNS)
    names = [method_label(m) + (f" + {REGULARIZER_LABELS.get(r, r)}" if r != "none" else "") for m, r in (first, second)]
    names = [f"({n})" if " + " in n else n for n in names]  # (BYOL + SO) - (BYOL + whitening)
    label = f"{what}{names[0]} - {names[1]} / " + table["dataset"].map(dataset_label)
    return _pairs(table, label, table[column].astype(float) - table[f"{column}_other"].astype(float))


def _whitening_claims(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Feature whitening against BYOL (representation) and against BYOL + SO (weights, hidden
    features), each paired by data set and seed."""
    white, byol, so = ("byol_whitening", "none"), ("byol", "none"), ("byol", "so")
    inside = pd.concat([_method_pairs(frame, "weight_flatness", so, white, "weight flatness: "),
                        _method_pairs(frame, "hidden_flatness", so, white, "hidden-feature flatness: ")],
                       ignore_index=True)
    return [
        *_claim_rows("whitening_representation", "Feature whitening keeps the representation from collapsing",
                     "Figure 2 (representations)", "effective rank of the representation: BYOL + whitening - BYOL",
                     _method_pairs(frame, "effective_rank", white, byol)),
        *_claim_rows("whitening_inside", "Whitening does not protect weights and hidden features as OR does",
                     "Figure 2 (weights, hidden features)",
                     "weight / hidden-feature flatness (stages before the last): BYOL + SO - BYOL + whitening", inside),
    ]


def _norm_control_claims(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Our control, which the paper does not run: SO against its diagonal part alone (the
    penalty on the rows' norms, ``sum_i G_ii^2``), each at its own chosen gamma, paired by
    method, data set and seed. If SO's effect came from keeping weight norms in check, the
    diagonal part alone would match it."""
    methods = sorted(frame.loc[frame["regularizer"] == "so_diag", "method"].unique()) if len(frame) else []
    pairs = [_method_pairs(frame, "knn_top1", (m, "so"), (m, "so_diag")) for m in methods]
    pairs = [p for p in pairs if len(p)]
    return _claim_rows("norm_control", "SO does more than keep weight norms in check (SO against its diagonal part alone)",
                       "our control, not in the paper", "kNN top-1: with SO - with SO diagonal, same seed",
                       pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame(columns=_PAIR_COLUMNS))


def _transfer_pairs(records: Sequence[Mapping[str, Any]], metric: str = "linear_top1") -> pd.DataFrame:
    """Each transfer probe with OR minus the probe without OR of the same pretraining method,
    data set, target and seed; a probe whose seed was not probed without OR has no partner and
    its difference is ``NaN`` (not measured), never a difference to another seed."""
    table = transfer_table(records)
    if table.empty:
        return pd.DataFrame(columns=_PAIR_COLUMNS)
    keys = ["target", "scale", "method", "pretrained on", "seed"]
    base = table[table["regularizer"] == "none"][[*keys, metric]]
    pairs = table[table["regularizer"] != "none"].merge(base, on=keys, how="left", suffixes=("", "_none"))
    gammas = {(r.get("scale"), r.get("name")): (r.get("summary") or {}).get("gamma") for r in records}
    pairs["gamma"] = [gammas.get((s, n)) for s, n in zip(pairs["scale"], pairs["name"])]
    label = (pairs["method"].map(method_label) + " / " + pairs["pretrained on"].map(dataset_label) + " / "
             + pairs["regularizer"].map(lambda r: _LABELS.get(r, r)))
    return _pairs(pairs, label, pairs[metric].astype(float) - pairs[f"{metric}_none"].astype(float),
                  suffix=" -> " + pairs["target"].map(dataset_label))


def claims(frame: pd.DataFrame, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The paper's claims, each per comparison with a verdict computed from the records (rule
    :data:`VERDICT_RULE`), indexed by a short id.

    A comparison holds the runs that share everything but the thing a claim is about: the
    method, data set and regularizer (and scale) of a claim about OR, paired by seed (same
    training subset and initialization; runs from :func:`select_runs`). Its row gives the mean
    of the signed paired differences (``effect``, > 0 agrees with the claim), their paired-t 95%
    interval, the number of seeds and the verdict of :func:`or_core.stats.paired_comparison`:
    "supported" (interval above 0), "no detectable effect" (containing 0), "contradicted"
    (below 0), "too few seeds" (one pair: no interval), "not measured" (the runs are recorded
    but the measure is not). Below a claim's comparisons, its own line (comparison
    :data:`ALL_COMPARISONS`) says in how many comparisons with >= 2 seeds it is supported, shows
    no detectable effect or is contradicted, and how many have too few seeds; a claim without
    any pair of runs has only that line, "no data yet".

    Hidden features and the representation are separate measurements: ``hidden`` uses the
    stages before the last (a ResNet's layer1-3; the pooled layer4 *is* the representation),
    ``representation`` the effective rank of the encoder's output.

    ``frame`` is :func:`records_frame` of ``records``. Columns: :data:`CLAIM_COLUMNS` (the ones
    to read), then ``scale``, ``paper``, the measure, ``ci_low``, ``ci_high``, the per-seed
    ``differences`` and ``n``/``positive``/``mean difference`` (seeds, how many differences
    are > 0, the effect). Ids: ``accuracy_so``, ``accuracy_srip``, ``accuracy_knn``, ``seeds``,
    ``orthogonality``, ``weights``, ``hidden``, ``representation``,
    ``whitening_representation``, ``whitening_inside``, ``norm_control`` (our control: SO against
    its diagonal part alone), ``transfer``.
    """
    byol10 = frame[(frame["method"] == "byol") & (frame["dataset"] == "cifar10")]
    rows = [
        *_or_claim("accuracy_so", frame, "OR (SO) improves linear accuracy across methods and data sets",
                   "Tables 1, 2, 4", "linear top-1: with SO - without", "linear_top1", regularizers=("so",)),
        *_or_claim("accuracy_srip", frame, "OR (SRIP) improves linear accuracy across methods and data sets",
                   "Table 2", "linear top-1: with SRIP - without", "linear_top1", regularizers=("srip",)),
        *_or_claim("accuracy_knn", frame, "OR improves kNN accuracy across methods and data sets", "Tables 2, 4",
                   "kNN top-1: with OR - without", "knn_top1"),
        *_or_claim("seeds", byol10, "BYOL + SO beats BYOL on CIFAR-10 over paired seeds", "Table 1 (single runs there)",
                   "kNN top-1: with SO - without, same seed", "knn_top1", regularizers=("so",)),
        *_or_claim("orthogonality", frame, "OR keeps the weights closer to orthogonal", "the OR objective",
                   "final orthogonality error sum of ||G||_F^2: without OR - with", "or_so_total", sign=-1.0),
        *_or_claim("weights", frame, "OR keeps weight spectra from collapsing", "Figure 2 (weights)",
                   "weight flatness (effective rank / size, mean over layers): with OR - without", "weight_flatness"),
        *_or_claim("hidden", frame, "OR keeps hidden-feature spectra from collapsing", "Figures 2, 3 (hidden features)",
                   "hidden-feature flatness (mean over the stages before the last, e.g. layer1-3): with OR - without",
                   "hidden_flatness"),
        *_or_claim("representation", frame, "OR keeps the representation from collapsing", "Figure 2 (representations)",
                   "effective rank of the representation (the encoder's output): with OR - without", "effective_rank"),
        *_whitening_claims(frame),
        *_norm_control_claims(frame),
        *_claim_rows("transfer", "OR improves transfer (frozen encoder, linear probe)", "Table 5",
                     "transfer linear top-1: with OR - without, same seed", _transfer_pairs(records)),
    ]
    table = pd.DataFrame(rows).set_index("id")
    table["seeds"] = table["seeds"].astype(int)
    table.loc[table["scale"] == NO_RECORDS, "scale"] = scale_label(frame)  # claims without pairs
    first = [*CLAIM_COLUMNS, "scale"]
    return table[first + [c for c in table.columns if c not in first]]


def claims_view(table: pd.DataFrame) -> pd.DataFrame:
    """A :func:`claims` table for reading: the columns of :data:`CLAIM_COLUMNS`, each claim
    written on its first row only, effects signed with four significant digits, ``-`` for
    an effect without a difference. The claim's own line keeps ``seeds``: the pairs of all its
    comparisons."""
    view = table[list(CLAIM_COLUMNS)].copy()
    view["effect"] = ["-" if pd.isna(v) else _signed(v) for v in view["effect"]]
    view.loc[view["comparison"] == ALL_COMPARISONS, "effect"] = ""
    view.loc[view["claim"].eq(view["claim"].shift()), "claim"] = ""
    return view


def claim_lines(table: pd.DataFrame) -> pd.DataFrame:
    """One row per claim of a :func:`claims` table: its own line and the counts of its
    comparisons' verdicts (:func:`claim_counts`), in the table's order."""
    rows = []
    for key in dict.fromkeys(table.index):
        part = table.loc[[key]]
        comparisons = part[part["comparison"] != ALL_COMPARISONS]
        own = part[part["comparison"] == ALL_COMPARISONS].iloc[0]
        rows.append({"id": key, "claim": own["claim"], "scale": own["scale"], "line": own["verdict"],
                     "comparisons": len(comparisons), **claim_counts(comparisons)})
    return pd.DataFrame(rows).set_index("id") if rows else pd.DataFrame()


def _with_interval(row: pd.Series) -> str:
    """``"BYOL / CIFAR-10 / SO (gamma 1e-5): +0.0083, 95% CI [-0.012, +0.029], 3 seeds"``."""
    return f"{row['comparison']}: {_signed(row['effect'])}, 95% CI {row['95% CI']}, {row['seeds']} seeds"


def claims_summary(table: pd.DataFrame) -> str:
    """The verdicts of a :func:`claims` table in plain words (Markdown): under each verdict of
    the comparisons with >= 2 seeds, the claims that got it, each with those comparisons' effect
    and interval and how many of its comparisons had too few seeds; then the claims with no
    comparison of >= 2 seeds, the ones not measured and the ones without data. Nothing in it is
    typed in: every word comes from ``table``."""
    if table.empty:
        return "No claims to report."
    scale = ", ".join(sorted(set(table["scale"].astype(str))))
    lines = [f"At the **{scale}** scale, each claim is checked per comparison (runs that share method, data set "
             f"and regularizer, paired by seed), against the rule *{VERDICT_RULE}*:", ""]
    overview = claim_lines(table)
    comparisons = table[table["comparison"] != ALL_COMPARISONS]
    for name in stats.VERDICTS:
        items = []
        for key, claim in overview[overview[name] > 0].iterrows():
            hits = comparisons.loc[[key]]
            hits = hits[hits["verdict"] == name]
            few = f"; {_plural(claim[TOO_FEW], 'other comparison')} with too few seeds" if claim[TOO_FEW] else ""
            items.append(f"{claim['claim'].rstrip('.')} "
                         f"({'; '.join(_with_interval(r) for _, r in hits.iterrows())}{few})")
        if items:
            lines.append(f"* **{name.capitalize()}**: {'; '.join(items)}.")
    few_only = overview[(overview["with an interval"] == 0) & (overview[TOO_FEW] > 0)]
    if not few_only.empty:
        items = "; ".join(f"{c['claim'].rstrip('.')} ({_plural(c[TOO_FEW], 'comparison')})"
                          for _, c in few_only.iterrows())
        lines.append(f"* **Too few seeds** (one seed per comparison: a difference, no verdict): {items}.")
    unmeasured = overview[(overview[NOT_MEASURED] > 0)]
    if not unmeasured.empty:
        items = "; ".join(f"{c['claim'].rstrip('.')} ({_plural(c[NOT_MEASURED], 'comparison')})"
                          for _, c in unmeasured.iterrows())
        lines.append(f"* **Not measured** (runs recorded, the measure not): {items}.")
    waiting = overview[overview["comparisons"] == 0]
    if not waiting.empty:
        lines.append(f"* **No data yet**: {'; '.join(waiting['claim'])}.")
    return "\n".join(lines)


#: Columns that count things (seeds, epochs, images, runs): shown as integers even when a gap
#: (``NaN``) made pandas store them as floats, so that a seed never reads ``1.000``.
INTEGER_COLUMNS = re.compile(r"(^|[ _])(seeds?|epochs?|of|n|positive|wins|runs|records|images|steps|comparisons|"
                             r"train_images|repeats|batch|classes)($|[ _])", re.IGNORECASE)


def _is_integer_column(column: Any, values: pd.Series) -> bool:
    name = column[-1] if isinstance(column, tuple) else column
    finite = values.dropna()
    integral = bool(len(finite)) and bool(np.all(np.mod(finite.astype(float), 1) == 0))
    return pd.api.types.is_integer_dtype(values) or (INTEGER_COLUMNS.search(str(name)) is not None and integral)


#: Where the book shows each claim's numbers: ``(MyST label, link text)`` of a section of
#: ``notebooks/05_figures.ipynb`` (the intro's claims table links there; the labels stand above
#: the sections' headings).
CLAIM_SECTIONS = {
    "accuracy_so": ("figures-methods", "05 §5"),
    "accuracy_srip": ("figures-methods", "05 §5"),
    "accuracy_knn": ("figures-methods", "05 §5"),
    "seeds": ("figures-seeds", "05 §4"),
    "orthogonality": ("figures-spectra", "05 §7"),
    "weights": ("figures-spectra", "05 §7"),
    "hidden": ("figures-stages", "05 §8"),
    "representation": ("figures-spectra", "05 §7"),
    "whitening_representation": ("figures-table1", "05 §3"),
    "whitening_inside": ("figures-spectra", "05 §7"),
    "transfer": ("figures-transfer", "05 §6"),
    "norm_control": ("figures-profile-paired", "05 §15"),
}
#: The columns of :func:`headline_claims`.
HEADLINE_COLUMNS = ("claim", "scale", "comparison", "effect", "95% CI", "seeds", "verdict", "comparisons",
                    "ci_low", "ci_high")
#: The claims measured in accuracy (a fraction): the book's first page writes them in points.
ACCURACY_CLAIMS = ("accuracy_so", "accuracy_srip", "accuracy_knn", "seeds", "transfer", "norm_control")
#: What the effect of the other claims is measured in, for a reader of the first page.
_CLAIM_UNITS = {"orthogonality": "SO error", "weights": "flatness", "hidden": "flatness",
                "representation": "effective rank", "whitening_representation": "effective rank",
                "whitening_inside": "flatness"}


def headline_claims(table: pd.DataFrame) -> pd.DataFrame:
    """One row per claim of a :func:`claims` table, for the book's first page: the comparison
    with the most seeds (the first of the table's order among equals; the best-powered test of
    the claim the records hold), its effect, 95% interval, seeds and verdict, and how many
    comparisons the claim has and how many of them have >= 2 seeds (``"1 of 7"``). A claim without any pair of
    runs reads "no data yet". Indexed by the claim's id."""
    rows = []
    for key in dict.fromkeys(table.index):
        part = table.loc[[key]].reset_index(drop=True)
        comparisons = part[part["comparison"] != ALL_COMPARISONS]
        own = part[part["comparison"] == ALL_COMPARISONS].iloc[0]
        row = {"id": key, "claim": own["claim"], "scale": own["scale"]}
        if comparisons.empty:
            rows.append({**row, "comparison": "-", "effect": math.nan, "95% CI": "-", "seeds": 0,
                         "verdict": NO_DATA, "comparisons": "none", "ci_low": math.nan, "ci_high": math.nan})
            continue
        best = comparisons.loc[comparisons["seeds"].astype(int).idxmax()]
        counts = claim_counts(comparisons)
        rows.append({**row, "comparison": best["comparison"], "effect": best["effect"], "95% CI": best["95% CI"],
                     "seeds": int(best["seeds"]), "verdict": best["verdict"],
                     "comparisons": f"{counts['with an interval']} of {len(comparisons)}",
                     "ci_low": best["ci_low"], "ci_high": best["ci_high"]})
    return pd.DataFrame(rows, columns=["id", *HEADLINE_COLUMNS]).set_index("id")


#: What Table 1 of the paper ranks, with the direction that is better (higher for all of them).
_TABLE1_MEASURES = {
    "knn_top1": "test kNN top-1", "linear_top1": "test linear top-1",
    "effective_rank": "the representation's effective rank", "weight_flatness": "weight-spectrum flatness",
    "hidden_flatness": "hidden-feature flatness",
}


def against_paper(frame: pd.DataFrame, dataset: str = "cifar10", seed: int = 0) -> list[str]:
    """Sentences (Markdown) on where the records of ``frame`` go against the paper, written from
    the numbers, never typed in; ``[]`` when they do not (or the runs are missing).

    * Table 1: the paper has BYOL + SO above BYOL + feature whitening; every measure of
      :data:`_TABLE1_MEASURES` where whitening is above SO is named, with both values.
    * The gamma grid: a regularized BYOL run whose weights end closer to orthogonal than
      without OR (lower ``or_so_total``) while its representation's effective rank is lower
      is named, with both pairs of values (the paper's argument runs from orthogonal weights to
      a flatter representation).

    Single runs (one seed) carry no interval. A gap counts only when it exceeds what a change of
    seed alone gives (:func:`seed_band`, from BYOL without OR on several seeds); without such
    seeds every gap counts and the sentence says there is nothing to compare it with.
    """
    sentences = []
    table = table1(frame, dataset, seed)
    if {"BYOL + SO", "BYOL + feature whitening"} <= set(table.index):
        so, white = table.loc["BYOL + SO"], table.loc["BYOL + feature whitening"]
        above = [f"{name} ({white[m]:.3f} against {so[m]:.3f})" for m, name in _TABLE1_MEASURES.items()
                 if not (pd.isna(so[m]) or pd.isna(white[m])) and white[m] - so[m] > (seed_band(frame, m, dataset) or 0.0)]
        if above:
            sentences.append(f"BYOL + feature whitening is above BYOL + SO on {', '.join(above)}, where the paper's "
                             f"Table 1 has OR ahead ({_DATASET_LABELS.get(dataset, dataset)}, seed {seed}, one run "
                             f"each: no interval; {_band_text(frame, dataset)}).")
    runs = frame[(frame["method"] == "byol") & (frame["dataset"] == dataset) & (frame["seed"] == seed)]
    base = runs[runs["regularizer"] == "none"]
    if len(base):
        none = base.iloc[0]
        for reg, part in runs[runs["regularizer"] != "none"].sort_values("gamma").groupby("regularizer", sort=True):
            band = seed_band(frame, "effective_rank", dataset) or 0.0
            hits = part[(part["or_so_total"] < none["or_so_total"])
                        & (none["effective_rank"] - part["effective_rank"] > band)]
            if hits.empty:
                continue
            last = hits.iloc[-1]
            gammas = ", ".join(gamma_text(g) for g in hits["gamma"])
            sentences.append(
                f"BYOL + {_LABELS.get(reg, reg)} at gamma {gammas} leaves the weights closer to orthogonal than BYOL "
                f"yet lowers the representation's effective rank, against the paper's argument from orthogonal "
                f"weights to a flatter representation (at {gamma_text(last['gamma'])}: orthogonality error "
                f"{last['or_so_total']:.4g} against {none['or_so_total']:.4g}, effective rank "
                f"{last['effective_rank']:.3g} against {none['effective_rank']:.3g}; seed {seed}, one run each; "
                f"{_band_text(frame, dataset)}).")
    return sentences


def seed_band(frame: pd.DataFrame, column: str, dataset: str = "cifar10") -> float | None:
    """How far two runs that differ only by their seed fall apart, 95% of the time:
    ``1.96 * sqrt(2) * sd``, with ``sd`` the sample standard deviation of ``column`` over the
    seeds of BYOL without OR on ``dataset`` (the difference of two independent runs has
    ``sqrt(2)`` times one run's spread). ``None`` below two seeds."""
    values = frame[(frame["method"] == "byol") & (frame["dataset"] == dataset) & (frame["regularizer"] == "none")]
    values = values[column].dropna().astype(float)
    return 1.96 * math.sqrt(2.0) * float(values.std(ddof=1)) if len(values) >= 2 else None


def _band_text(frame: pd.DataFrame, dataset: str) -> str:
    seeds = int(((frame["method"] == "byol") & (frame["dataset"] == dataset) & (frame["regularizer"] == "none")).sum())
    if seeds < 2:
        return "no seeds of BYOL without OR to measure the spread between seeds"
    return f"each gap beyond what a change of seed gives, from BYOL without OR on {seeds} seeds"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def claims_markdown(headline: pd.DataFrame, sections: Mapping[str, tuple[str, str]] | None = None) -> str:
    """A :func:`headline_claims` table as a MyST Markdown table, each row ending with a
    ``{ref}`` link to the section that shows the claim (:data:`CLAIM_SECTIONS`), so that a
    broken link fails the strict build.

    Columns: claim, comparison, effect, 95% CI, seeds, verdict, section; a scale column only
    when the rows come from more than one scale (the page names a single scale in its text).
    How many of the claim's comparisons have an interval goes in the comparison's cell: a
    column of its own made eight columns that broke their headers letter by letter at 690 px.
    """
    sections = CLAIM_SECTIONS if sections is None else sections
    several_scales = headline["scale"].nunique() > 1
    header = ["claim", *(["scale"] if several_scales else []), "comparison (the one with the most seeds)",
              "effect", "95% CI", "seeds", "verdict", "section"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for key, row in headline.iterrows():
        label, text = sections.get(str(key), (None, ""))
        where = f"{{ref}}`{text} <{label}>`" if label else "-"
        effect, interval = _headline_effect(str(key), row)
        comparison = row["comparison"]
        if row["comparisons"] != "none":
            comparison = f"{comparison} ({row['comparisons']} comparisons with >= {stats.MIN_SEEDS} seeds)"
        cells = [row["claim"], *([row["scale"]] if several_scales else []), comparison, effect, interval,
                 int(row["seeds"]), f"**{row['verdict']}**", where]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _headline_effect(key: str, row: pd.Series) -> tuple[str, str]:
    """The effect and interval cells of a headline row: accuracy claims in percentage points
    with one decimal (``"-0.5 pt"``, ``"[-3.9, +3.0] pt"``), the others as computed, followed
    by what they measure (``"-2.426 (SO error)"``)."""
    if pd.isna(row["effect"]):
        return "-", row["95% CI"]
    low, high = row.get("ci_low", math.nan), row.get("ci_high", math.nan)
    if key in ACCURACY_CLAIMS:
        interval = row["95% CI"] if pd.isna(low) else f"[{100 * low:+.1f}, {100 * high:+.1f}] pt"
        return f"{100 * float(row['effect']):+.1f} pt", interval
    unit = _CLAIM_UNITS.get(key)
    return _signed(float(row["effect"])) + (f" ({unit})" if unit else ""), row["95% CI"]


#: Where a record links to: the repository's files on GitHub (the book's ``repository.url``).
REPOSITORY_URL = "https://github.com/or-core/or_core/blob/main"


def record_link(path: str | Path, root: str | Path | None = None) -> str:
    """A Markdown link to a record file in the repository (``[results/x.json](https://...)``):
    record paths on the book's pages are links, not text. ``path`` is taken relative to
    ``root`` (default: the repository root, which a path under ``../results`` from
    ``notebooks/`` resolves into)."""
    base = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    resolved = Path(path).resolve()
    try:
        relative = resolved.relative_to(base.resolve()).as_posix()
    except ValueError:  # outside the repository (a build's own records): no page to link to
        try:
            return f"`~/{resolved.relative_to(Path.home().resolve()).as_posix()}`"  # not the builder's home
        except ValueError:
            return f"`{path}`"
    return f"[{relative}]({REPOSITORY_URL}/{relative})"


def published_baselines(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The published numbers of ``results/published/baselines.json`` (lightly, solo-learn), each
    with its library, protocol, epochs, batch size and source."""
    path = (Path(path) if path is not None
            else Path(__file__).resolve().parents[1] / "results" / "published" / "baselines.json")
    return list(load_record(path).get("baselines", []))


def baselines_table(frame: pd.DataFrame, baselines: Sequence[Mapping[str, Any]], method: str = "byol",
                    seed: int = 0) -> pd.DataFrame:
    """Published numbers beside ours: for each published (method, data set, metric), the row
    of the library and, under it, our run without OR of the same method and data set at every
    scale recorded in ``frame`` (seed ``seed``), each with its epochs and protocol. Nothing is
    compared by a verdict: the protocols differ, and the table says how."""
    runs = select_runs(frame, seed)
    rows = []
    for entry in baselines:
        if entry.get("method") != method:
            continue
        rows.append({"source": entry["library"], "dataset": entry["dataset"], "metric": entry["metric"],
                     "value": float(entry["value"]), "epochs": entry.get("epochs"), "batch": entry.get("batch_size"),
                     "width": 1.0, "protocol": entry.get("protocol", "")})
        ours = runs[(runs["method"] == method) & (runs["dataset"] == entry["dataset"])
                    & (runs["regularizer"] == "none")]
        for _, run in ours.iterrows():
            rows.append({"source": f"or_core [{run['scale']}]", "dataset": entry["dataset"], "metric": entry["metric"],
                         "value": float(run[entry["metric"]]), "epochs": run["epochs"], "batch": math.nan,
                         "width": run["width"], "protocol": _OUR_PROTOCOL.get(entry["metric"], "")})
    columns = ["source", "dataset", "metric", "value", "epochs", "batch", "width", "protocol"]
    return pd.DataFrame(rows, columns=columns)


_OUR_PROTOCOL = {
    "knn_top1": "weighted kNN (k = 200, t = 0.1) on the scale's training / test images, final epoch",
    "linear_top1": "linear probe trained after pretraining on the frozen features, final epoch",
}


def styled(table: pd.DataFrame, digits: int = 3) -> Any:
    """``table`` for display: gammas as ``1e-6`` (one format everywhere, never broken across
    lines), counts as integers (:data:`INTEGER_COLUMNS`: seeds, epochs, images...), other
    numbers with ``digits`` decimals, gaps as ``-``. Returns a pandas ``Styler`` (the notebook
    shows it as HTML)."""
    def is_gamma(column: Any) -> bool:
        return "gamma" in (column if isinstance(column, tuple) else (column,))

    def formatter(column: Any) -> Any:
        if is_gamma(column):
            return lambda v: "-" if pd.isna(v) else gamma_text(v)
        if _is_integer_column(column, table[column]):
            return lambda v: "-" if pd.isna(v) else f"{int(v):,}"
        return lambda v, d=digits: "-" if pd.isna(v) else f"{v:.{d}f}"

    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and table[c].dtype != bool]
    gammas = [c for c in table.columns if is_gamma(c)]
    style = table.style.format({c: formatter(c) for c in numeric})
    if gammas:  # "1e-6" must not wrap at its hyphen ("1e-/6")
        style = style.set_properties(subset=gammas, **{"white-space": "nowrap"})
    return style.set_table_attributes('class="or-table"')


#: The environment variable naming the folder a :class:`TableView` writes its CSV into
#: (``python -m or_core.book`` sets it, per notebook, to a folder that the built page links to
#: as ``<folder name>/<table>.csv``). Unset (Colab, Jupyter), the CSV is embedded in the link.
TABLES_ENV = "OR_CORE_TABLES_DIR"
#: Tables with more rows than this are shown collapsed (a click opens them).
LONG_TABLE_ROWS = 12


class TableView:
    """A table as the book shows it: :func:`styled`, with a link to its CSV beside it, collapsed
    when it has more than :data:`LONG_TABLE_ROWS` rows.

    The CSV holds the numbers at full precision. Its file is ``<$OR_CORE_TABLES_DIR>/<name>.csv``
    when that variable is set (the book), else the link carries the CSV itself (a ``data:``
    URL), so a notebook run anywhere offers the same download.
    """

    def __init__(self, table: pd.DataFrame, name: str, digits: int = 3, caption: str | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"table name {name!r}: letters, digits, '.', '_' and '-' only (it names a file)")
        self.table, self.name, self.digits, self.caption = table, name, digits, caption
        self.csv = table.to_csv()
        folder = os.environ.get(TABLES_ENV)
        if folder:
            path = Path(folder) / f"{name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.csv)
            self.href = f"{Path(folder).name}/{name}.csv"
        else:
            self.href = "data:text/csv;base64," + base64.b64encode(self.csv.encode()).decode()

    def _repr_html_(self) -> str:
        body = styled(self.table, self.digits).to_html()
        rows = len(self.table)
        link = (f'<p class="or-table-csv"><a href="{html.escape(self.href)}" download="{self.name}.csv">'
                f"{self.name}.csv</a> ({rows} row{'s' if rows != 1 else ''}, full precision)</p>")
        caption = f"<p>{html.escape(self.caption)}</p>" if self.caption else ""
        if rows > LONG_TABLE_ROWS:
            body = f"<details><summary>Show the table ({rows} rows)</summary>{body}</details>"
        return f'<div class="or-table-view">{caption}{body}{link}</div>'


def show(table: pd.DataFrame, name: str, digits: int = 3, caption: str | None = None) -> TableView:
    """``table`` for a notebook page: styled, its CSV beside it, collapsed when long
    (:class:`TableView`). ``name`` names the CSV file (unique on its page)."""
    return TableView(table, name, digits, caption)


# ----------------------------------------------------------------------------------------------
# Bookkeeping: runs still missing, the OR-overhead benchmark
# ----------------------------------------------------------------------------------------------
def missing_runs(matrix: str | Path, results: str | Path | None = None) -> pd.DataFrame:
    """The runs of a matrix file without a record yet (:func:`or_core.matrix.pending_runs`, the
    dry run of :func:`or_core.experiments.run_matrix`; nothing is trained or written). A run whose gamma is
    still to be chosen appears with ``chosen`` in its name. A missing matrix file gives an
    empty table."""
    columns = ["name", "groups"]
    if not Path(matrix).is_file():
        return pd.DataFrame(columns=columns)
    spec = load_matrix(matrix, results)
    groups = {e.name: ", ".join(e.groups) for e in spec.experiments}
    pending = pending_runs(spec)
    rows = []
    for name in pending:
        key = name if name in groups else next((n for n in groups if _same_run(n, name)), name)
        rows.append({"name": name, "groups": groups.get(key, "")})
    return pd.DataFrame(rows, columns=columns)


def folders_summary(folders: Mapping[str, Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    """One row per folder of records: how many, their scales, the newest record's date."""
    rows = [{"folder": name, "records": len(records), "scale": scale_label(records),
             "newest (UTC)": max((str((r.get("provenance") or {}).get("date_utc", "")) for r in records), default="-")}
            for name, records in folders.items()]
    return pd.DataFrame(rows, columns=["folder", "records", "scale", "newest (UTC)"]).set_index("folder")


def matrix_runs(matrix: str | Path) -> pd.DataFrame:
    """The runs a matrix file names: one row per run with its groups, method, data set,
    regularizer, gamma (``chosen``: picked on validation once the grid is recorded) and seed."""
    rows = [{"run": e.name, "groups": ", ".join(e.groups),
             **{k: e.overrides.get(k) for k in ("method", "dataset", "regularizer", "gamma", "seed")},
             "outside_paper_grid": e.outside_paper_grid, "transfer": ", ".join(e.transfer)}
            for e in load_matrix(matrix).experiments]
    columns = ["run", "groups", "method", "dataset", "regularizer", "gamma", "seed", "outside_paper_grid", "transfer"]
    return pd.DataFrame(rows, columns=columns).set_index("run")


def load_folder(folder: str | Path) -> list[dict[str, Any]]:
    """The records under ``folder`` (:func:`or_core.records.load_records`); ``[]`` when the
    folder does not exist yet."""
    return load_records(folder) if Path(folder).is_dir() else []


def matrix_records(matrix: str | Path, results: str | Path | None = None) -> list[dict[str, Any]]:
    """The records of a matrix file's runs (its ``results`` folder, or ``results``); records of
    runs the file no longer names are left out. ``[]`` when nothing is recorded yet."""
    spec = load_matrix(matrix, results)
    names = [e.name for e in spec.experiments]
    return [r for r in load_folder(spec.results)
            if r.get("name") in names or any(_same_run(n, str(r.get("name"))) for n in names)]


def _same_run(template: str, name: str) -> bool:
    """Whether ``name`` is the chosen-gamma ``template`` (``...-so-chosen-s1``) resolved."""
    head, _, seed = template.rpartition("-chosen-")
    return bool(head) and name.startswith(head + "-") and name.endswith("-" + seed)


def overhead_table(benchmark: Mapping[str, Any]) -> pd.DataFrame:
    """The OR-overhead benchmark (``results/benchmarks/or_overhead_*.json``) as one row per
    (measurement, variant): seconds per training step, step time relative to no OR, seconds of
    the OR term alone and the ratio it adds."""
    rows = []
    for run in benchmark.get("runs", []):
        step, ratio = run.get("step_s", {}), run.get("step_median_ratio_vs_none", {})
        only, added = run.get("or_only_s", {}), run.get("additive_ratio_vs_none", {})
        for variant in dict.fromkeys([*step, *only]):
            rows.append({
                "measurement": run.get("label", ""), "variant": variant, "step_s": step.get(variant, math.nan),
                "step / none (median)": 1.0 if variant == "none" else ratio.get(variant, math.nan),
                "OR term alone (s)": only.get(variant, math.nan),
                "(step + OR term) / step": added.get(variant, math.nan),
            })
    columns = ["measurement", "variant", "step_s", "step / none (median)", "OR term alone (s)",
               "(step + OR term) / step"]
    return pd.DataFrame(rows, columns=columns).set_index(["measurement", "variant"])


def overhead_times(benchmark: Mapping[str, Any], measurement: int = 0) -> tuple[dict[str, list[float]], str]:
    """What :func:`or_core.plots.overhead_figure` draws: ``{variant: [seconds of the OR term
    alone]}`` of one measurement of the benchmark, and the title (with its scale)."""
    runs = benchmark.get("runs", [])
    run = runs[measurement] if len(runs) > measurement else {}
    times = {variant: [seconds] for variant, seconds in (run.get("or_only_s") or {}).items()}
    scale = textwrap.fill(str(benchmark.get("scale", "unknown scale")), 60)
    return times, f"OR term alone, per step: {run.get('label', 'no data yet')}\n[{scale}]"


# ----------------------------------------------------------------------------------------------
# Every method at one profile, against raw pixels and the untrained encoder
# ----------------------------------------------------------------------------------------------
#: The untrained encoder's kNN of the cpu profile's CIFAR-10 records made before each record
#: carried its own ``untrained_knn_top1`` (``results/cpu_profile/untrained_reference.py``).
UNTRAINED_REFERENCE = Path(__file__).resolve().parents[1] / "results" / "cpu_profile" / "untrained_encoder_cifar10.json"


def untrained_knn_by_seed(path: str | Path = UNTRAINED_REFERENCE) -> dict[int, float]:
    """``{seed: kNN top-1 of the untrained encoder}`` of a reference record ({} without one)."""
    path = Path(path)
    if not path.is_file():
        return {}
    return {int(row["seed"]): float(row["untrained_knn_top1"]) for row in load_record(path)["rows"]}


def methods_at_profile(
    records: Sequence[Mapping[str, Any]], untrained: Mapping[int, float] | None = None
) -> pd.DataFrame:
    """One row per record of a method trained once without OR: its kNN and linear top-1, kNN on
    raw pixels and on the same encoder untrained (the record's ``untrained_knn_top1``, else
    ``untrained[seed]``) on the same images, and its training minutes; best kNN first."""
    untrained = untrained_knn_by_seed() if untrained is None else untrained
    rows = []
    for record in records:
        s = record["summary"]
        rows.append({
            "method": method_label(record["config"]["method"]),
            "kNN top-1": s["knn_top1"], "linear top-1": s["linear_top1"],
            "raw pixels kNN": s.get("raw_pixels_knn_top1", math.nan),
            "untrained kNN": (s["untrained_knn_top1"] if s.get("untrained_knn_top1") is not None
                              else untrained.get(int(s["seed"]), math.nan)),
            "training minutes": s["wall_time_s"] / 60,
        })
    columns = ["method", "kNN top-1", "linear top-1", "raw pixels kNN", "untrained kNN", "training minutes"]
    return pd.DataFrame(rows, columns=columns).sort_values("kNN top-1", ascending=False, kind="stable")


def methods_at_profile_markdown(table: pd.DataFrame) -> str:
    """:func:`methods_at_profile` as the README's Markdown table: accuracies to 3 places, whole
    minutes."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        cells = [row["method"], *(f"{row[c]:.3f}" for c in table.columns[1:5]), f"{row['training minutes']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
