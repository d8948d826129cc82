"""Tables, figures and claim checks made from result records (``results/**/*.json``).

Every table and figure of notebooks 03 and 05 comes from here; the notebooks only call these
functions. Each record is one run of an experiment matrix (:mod:`or_core.experiments`): its
config, summary numbers, collapse spectra, transfer probes and the scale it was made at.

* :func:`load_folder`, :func:`matrix_records`: records from disk; :func:`records_frame`: one
  row per run, with spectral flatness measures derived from the stored spectra;
* :func:`accuracy_table`, :func:`gamma_table`, :func:`table1`, :func:`paired_seeds`,
  :func:`paired_summary`, :func:`transfer_table`, :func:`overhead_table`,
  :func:`matrix_runs`, :func:`missing_runs`, :func:`folders_summary`: tables (shown with
  :func:`styled`);
* :func:`gamma_response`, :func:`spectra_figure`, :func:`figure2`,
  :func:`save_spectra_figure`, :func:`stage_spectra_figure`, :func:`overhead_figure`: figures,
  each titled with the scale of its records;
* :func:`claims`: the paper's claims, each with the numbers that speak to it and a verdict
  computed from them (never typed in).

Example (from the repository root)::

    from or_core import report

    records = report.load_folder("results/matrix_cpu")
    frame = report.records_frame(records)
    report.accuracy_table(frame)
    report.claims(frame, records)[["claim", "n", "verdict"]]
    fig = report.figure2(records)

A matrix that is only partly recorded is fine everywhere: a missing run leaves a gap (``NaN``),
an empty panel says "no data yet", and a claim without numbers gets the verdict "no data yet".

When several records could stand for one (method, data set, regularizer, seed), for example
the runs of the gamma grid, :func:`select_runs` takes the run whose gamma was chosen on the
validation split; without a choice, the paper-grid run with the best validation kNN.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from or_core import plots
from or_core.experiments import load_matrix, run_matrix
from or_core.records import load_records

__all__ = [
    "METRICS",
    "REGULARIZERS",
    "SUPPORTED",
    "NOT_SUPPORTED",
    "MIXED",
    "NO_DATA",
    "NO_RECORDS",
    "COLUMNS",
    "spectrum_effective_rank",
    "records_frame",
    "scale_label",
    "select_runs",
    "accuracy_table",
    "gamma_table",
    "gamma_response",
    "table1",
    "paired_seeds",
    "paired_summary",
    "paired_differences",
    "transfer_table",
    "figure2_runs",
    "figure3_runs",
    "spectra_figure",
    "figure2",
    "save_spectra_figure",
    "stage_spectra_figure",
    "verdict",
    "VERDICT_RULE",
    "claims",
    "claims_summary",
    "styled",
    "missing_runs",
    "matrix_runs",
    "folders_summary",
    "load_folder",
    "matrix_records",
    "overhead_table",
    "overhead_figure",
]

#: The accuracy numbers of a record's summary: kNN and linear probe, top-1 and top-5.
METRICS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")
#: The regularizers compared, the baseline first.
REGULARIZERS = ("none", "so", "srip")
#: Verdicts of :func:`claims`.
SUPPORTED, NOT_SUPPORTED, MIXED, NO_DATA = "supported", "not supported", "mixed", "no data yet"
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
_LABELS = {"none": "none", "so": "SO", "srip": "SRIP"}
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
        "hidden_flatness": _flatness(list((collapse.get("hidden") or {}).values())),
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
    ``hidden_flatness`` over the pooled stage outputs, ``representation_flatness`` of the
    encoder's output. Objects that are not run records (no ``config``/``summary``, e.g. a
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


def _titled(title: str, runs: Mapping[str, Mapping[str, Any]]) -> str:
    """``title`` ending with the runs' scale tag (added when it is not there yet)."""
    tag = _scale_tag(list(runs.values()))
    return title if title.endswith(tag) else f"{title} {tag}"


def _backbone_text(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """``"ResNet-18, width 0.125"`` from the runs' configs (``"ResNet-18"`` at full width)."""
    widths = sorted({float(r.get("config", {}).get("width", 1.0)) for r in runs.values()})
    names = sorted({str(r.get("config", {}).get("backbone", "resnet18")) for r in runs.values()}) or ["resnet18"]
    name = ", ".join(n.replace("resnet", "ResNet-") for n in names)
    return name if widths in ([], [1.0]) else f"{name}, width {', '.join(f'{w:g}' for w in widths)}"


def _gamma_text(gamma: float) -> str:
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
        [(m, c) for m in metrics for c in (*REGULARIZERS, "SO - none", "SRIP - none")]
        + [("gamma", "so"), ("gamma", "srip")]
    )
    if runs.empty:
        return pd.DataFrame(columns=columns, index=pd.MultiIndex.from_tuples([], names=["method", "dataset"]))
    keys = ["method", "dataset"] + (["scale"] if runs["scale"].nunique() > 1 else [])
    runs = runs[runs["method"] != "byol_whitening"]
    table = pd.DataFrame(index=pd.MultiIndex.from_frame(runs[keys].drop_duplicates()), columns=columns, dtype=float)
    for metric in [*metrics, "gamma"]:
        wide = runs.pivot_table(index=keys, columns="regularizer", values=metric, aggfunc="first")
        for reg in REGULARIZERS:
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
    frame: pd.DataFrame, measure: str, regularizers: Sequence[str] = ("so", "srip"), seed: int | None = None
) -> pd.DataFrame:
    """Every run with OR against the run without OR of the same method, data set and seed:
    ``measure`` of both and ``delta = with OR - without``."""
    runs = select_runs(frame, seed)
    base = runs[runs["regularizer"] == "none"]
    keys = ["scale", "method", "dataset", "seed"]
    pairs = runs[runs["regularizer"].isin(regularizers)].merge(base[[*keys, measure]], on=keys, suffixes=("", "_none"))
    table = pairs[[*keys, "regularizer", "gamma"]].copy()
    table["without OR"] = pairs[f"{measure}_none"].astype(float)
    table["with OR"] = pairs[measure].astype(float)
    table["delta"] = table["with OR"] - table["without OR"]
    return table.dropna(subset=["delta"]).reset_index(drop=True)


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


def _transfer_differences(records: Sequence[Mapping[str, Any]], metric: str = "linear_top1") -> pd.DataFrame:
    """Each transfer probe with OR minus the one without OR of the same pretraining method,
    data set and target: of the same seed when that one was probed (``paired``), else of the
    mean over the seeds probed without OR (``paired`` false)."""
    table = transfer_table(records)
    keys = ["target", "scale", "method", "pretrained on"]
    base = table[table["regularizer"] == "none"]
    other = table[table["regularizer"] != "none"]
    same_seed = other.merge(base[[*keys, "seed", metric]], on=[*keys, "seed"], suffixes=("", "_none"))
    same_seed["paired"] = True
    means = base.groupby(keys, as_index=False)[metric].mean()
    rest = other.merge(same_seed[[*keys, "seed", "regularizer"]], on=[*keys, "seed", "regularizer"], how="left",
                       indicator=True)
    rest = rest[rest["_merge"] == "left_only"].drop(columns="_merge")
    unpaired = rest.merge(means, on=keys, suffixes=("", "_none"))
    unpaired["paired"] = False
    pairs = pd.concat([same_seed, unpaired], ignore_index=True)
    pairs["delta"] = pairs[metric] - pairs[f"{metric}_none"]
    return pairs.sort_values([*keys, "regularizer", "seed"], ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def gamma_response(
    frame: pd.DataFrame,
    method: str = "byol",
    dataset: str = "cifar10",
    metrics: Sequence[str] = ("val_knn_top1", "knn_top1"),
) -> Figure:
    """Dose-response of gamma: each metric against gamma (log scale), one line per regularizer,
    paper-grid gammas filled, gammas outside the grid hollow, the chosen gamma ringed, the run
    without OR as a dashed line. One panel per metric."""
    table = gamma_table(frame, method, dataset)
    runs = frame[(frame["method"] == method) & (frame["dataset"] == dataset) & (frame["seed"] == 0)]
    base = runs[runs["regularizer"] == "none"]
    with sns.axes_style(plots.STYLE):
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), layout="constrained", squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        series, chosen = {}, {}
        for reg, part in table.groupby("regularizer", sort=True):
            label = f"{method} + {_LABELS.get(reg, reg)}"
            series[label] = (part["gamma"], part[metric], part["outside_paper_grid"].tolist())
            if part["gamma_chosen"].any():
                chosen[label] = float(part.loc[part["gamma_chosen"], "gamma"].iloc[0])
        baselines = {f"{method} without OR": float(base[metric].iloc[0])} if len(base) else {}
        name = _METRIC_NAMES.get(metric, metric)
        plots.plot_dose_response(series, name, baselines=baselines, chosen=chosen, xlabel="gamma", ylabel=metric, ax=ax)
    fig.suptitle(f"{method} on {dataset}: accuracy against gamma {_scale_tag(runs)}\n"
                 "(filled: the paper's grid; hollow: outside it; ringed: chosen on validation)", fontsize="medium")
    return fig


def _pick(frame: pd.DataFrame, records: Sequence[Mapping[str, Any]], wanted: Mapping[str, tuple[str, str]],
          dataset: str, seed: int) -> dict[str, Mapping[str, Any]]:
    """``{label: record}`` of the selected (method, regularizer) runs on ``dataset``."""
    by_name = {(r.get("scale"), r.get("name")): r for r in records}
    runs = select_runs(frame[frame["dataset"] == dataset], seed)
    out = {}
    for label, (method, reg) in wanted.items():
        match = runs[(runs["method"] == method) & (runs["regularizer"] == reg)]
        if len(match):
            row = match.iloc[0]
            gamma = f" (gamma {_gamma_text(row['gamma'])})" if reg != "none" else ""
            out[label + gamma] = by_name[(row["scale"], row["name"])]
    return out


def figure2_runs(
    records: Sequence[Mapping[str, Any]], dataset: str = "cifar10", seed: int = 0, include_srip: bool = False
) -> dict[str, Mapping[str, Any]]:
    """The runs of Figure 2: BYOL, BYOL + feature whitening, BYOL + SO (and + SRIP), the ones
    recorded."""
    wanted = {"BYOL": ("byol", "none"), "BYOL + whitening": ("byol_whitening", "none"), "BYOL + SO": ("byol", "so")}
    if include_srip:
        wanted["BYOL + SRIP"] = ("byol", "srip")
    return _pick(records_frame(records), records, wanted, dataset, seed)


def figure3_runs(
    records: Sequence[Mapping[str, Any]], method: str = "byol", dataset: str = "cifar10", seed: int = 0
) -> dict[str, Mapping[str, Any]]:
    """The runs of Figure 3: one method without OR, with SO and with SRIP, the ones recorded."""
    wanted = {f"{method}": (method, "none"), f"{method} + SO": (method, "so"), f"{method} + SRIP": (method, "srip")}
    return _pick(records_frame(records), records, wanted, dataset, seed)


def _stage_last_convs(names: Sequence[str]) -> list[str]:
    """The last convolution of each ResNet stage (``layer1.1.conv2`` ...), else every name."""
    last = {}
    for name in names:
        stage = name.split(".")[0]
        if stage.startswith("layer") and "downsample" not in name:
            last[stage] = name
    return list(last.values()) or list(names)


def spectra_figure(
    records: Sequence[Mapping[str, Any]],
    kind: str = "weights",
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    layers: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Figure 2 analogue for one kind of spectrum, one line per run (default
    :func:`figure2_runs`): normalized eigenvalues, descending, log scale.

    ``kind``: ``"weights"`` (Gram spectra; one panel per layer of ``layers``, default the last
    convolution of each stage), ``"hidden"`` (covariance of each stage's pooled output; one
    panel per stage) or ``"representation"`` (one panel). The title states the records' scale.
    """
    if kind not in ("weights", "hidden", "representation"):
        raise ValueError(f"kind must be 'weights', 'hidden' or 'representation', got {kind!r}")
    runs = figure2_runs(records) if runs is None else runs
    collapse = {label: r.get("collapse") or {} for label, r in runs.items()}
    if kind == "representation":
        panels = {"representation": {k: c["representation"] for k, c in collapse.items() if c.get("representation")}}
    else:
        available = list(dict.fromkeys(n for c in collapse.values() for n in (c.get(kind) or {})))
        chosen = list(layers) if layers is not None else (_stage_last_convs(available) if kind == "weights" else available)
        panels = {layer: {k: c[kind][layer] for k, c in collapse.items() if layer in (c.get(kind) or {})}
                  for layer in chosen}
    what = {"weights": "weight Gram", "hidden": "hidden-feature covariance", "representation": "representation covariance"}
    title = _titled(title or f"Eigenvalue spectra of {what[kind]} matrices", runs)
    return plots.plot_spectra_panels(panels, title)


def figure2(
    records: Sequence[Mapping[str, Any]],
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    weight_layer: str | None = None,
    hidden_layer: str | None = None,
    title: str | None = None,
) -> Figure:
    """The main Figure 2 analogue in three panels: a weight's Gram spectrum, a hidden stage's
    feature spectrum and the representation's, for BYOL, BYOL + whitening and BYOL + OR.

    ``weight_layer`` defaults to the last convolution of the last stage (``layer4.1.conv2``),
    ``hidden_layer`` to the last stage but one (``layer3``), whose output is not the
    representation itself."""
    runs = figure2_runs(records) if runs is None else runs
    collapse = {label: r.get("collapse") or {} for label, r in runs.items()}
    weights = list(dict.fromkeys(n for c in collapse.values() for n in (c.get("weights") or {})))
    stages = list(dict.fromkeys(n for c in collapse.values() for n in (c.get("hidden") or {})))
    weight_layer = weight_layer or (_stage_last_convs(weights)[-1] if weights else "weights")
    hidden_layer = hidden_layer or (stages[-2] if len(stages) > 1 else stages[-1] if stages else "hidden")
    panels = {
        f"weights: {weight_layer}": {k: c["weights"][weight_layer] for k, c in collapse.items()
                                     if weight_layer in (c.get("weights") or {})},
        f"hidden features: {hidden_layer}": {k: c["hidden"][hidden_layer] for k, c in collapse.items()
                                             if hidden_layer in (c.get("hidden") or {})},
        "representation": {k: c["representation"] for k, c in collapse.items() if c.get("representation")},
    }
    title = _titled(title or f"Figure 2 analogue: BYOL on CIFAR-10, {_backbone_text(runs)}", runs)
    return plots.plot_spectra_panels(panels, title, ncols=3)


def save_spectra_figure(
    records: Sequence[Mapping[str, Any]],
    fallback: Sequence[Mapping[str, Any]],
    path: str | Path,
    expected: str = "cpu-small",
    dpi: int = 130,
) -> Figure:
    """:func:`figure2` of ``records`` (of scale ``expected``) saved as ``path``, the README's
    figure. When ``records`` hold none of its runs, ``fallback``'s are drawn instead and the
    title says so."""
    title = None
    if not figure2_runs(records) and figure2_runs(fallback):
        records = fallback
        title = f"Figure 2 analogue, FALLBACK: no {expected} records yet, the {scale_label(fallback)} records instead"
    fig = figure2(records, title=title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return fig


def stage_spectra_figure(
    records: Sequence[Mapping[str, Any]], runs: Mapping[str, Mapping[str, Any]] | None = None, title: str | None = None
) -> Figure:
    """Figure 3 analogue: the hidden-feature spectrum of each ResNet stage (one panel per
    stage), without OR, with SO and with SRIP (default :func:`figure3_runs`)."""
    runs = figure3_runs(records) if runs is None else runs
    title = _titled(title or f"Figure 3 analogue: hidden features per stage, BYOL on CIFAR-10, {_backbone_text(runs)}", runs)
    return spectra_figure(records, "hidden", runs=runs, title=title)


# ----------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------
def verdict(deltas: Sequence[float]) -> str:
    """The verdict of signed differences, each positive when it agrees with a claim: no numbers
    -> "no data yet"; every one positive -> "supported"; at most half positive -> "not
    supported"; otherwise "mixed"."""
    values = [float(d) for d in deltas if d is not None and not math.isnan(float(d))]
    if not values:
        return NO_DATA
    positive = sum(v > 0 for v in values)
    if positive == len(values):
        return SUPPORTED
    return NOT_SUPPORTED if positive <= len(values) / 2 else MIXED


VERDICT_RULE = "every difference > 0: supported; at most half > 0: not supported; else mixed"


def _claim(key: str, claim: str, source: str, measure: str, deltas: Sequence[float], labels: Sequence[str]) -> dict[str, Any]:
    """One row of :func:`claims`: the differences, their count and sign, the verdict."""
    values = [float(d) for d in deltas]
    details = "; ".join(f"{label}: {value:+.4g}" for label, value in zip(labels, values))
    return {
        "id": key,
        "claim": claim,
        "paper": source,
        "measure (difference > 0 agrees)": measure,
        "n": len(values),
        "positive": int(sum(v > 0 for v in values)),
        "mean difference": float(np.mean(values)) if values else math.nan,
        "differences": details or "-",
        "verdict": verdict(values),
    }


def _or_claim(key: str, frame: pd.DataFrame, claim: str, source: str, measure: str, column: str,
              sign: float = 1.0, regularizers: Sequence[str] = ("so", "srip"), seed: int | None = None) -> dict[str, Any]:
    """A claim about OR: runs with OR against the same runs without (:func:`paired_differences`)."""
    table = paired_differences(frame, column, regularizers, seed)
    labels = [f"{m}/{d}/s{sd} {_LABELS.get(r, r)}"
              for m, d, sd, r in zip(table["method"], table["dataset"], table["seed"], table["regularizer"])]
    return _claim(key, claim, source, measure, (sign * table["delta"]).tolist(), labels)


def _whitening_claims(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Feature whitening against BYOL (representation) and against BYOL + SO (weights, hidden)."""
    runs = select_runs(frame, seed=None)
    keys = ["scale", "dataset", "seed"]
    white = runs[(runs["method"] == "byol_whitening") & (runs["regularizer"] == "none")]
    byol = runs[(runs["method"] == "byol") & (runs["regularizer"] == "none")]
    so = runs[(runs["method"] == "byol") & (runs["regularizer"] == "so")]
    rep = white.merge(byol, on=keys, suffixes=("", "_byol"))
    inner = white.merge(so, on=keys, suffixes=("", "_so"))
    deltas, labels = [], []
    for column in ("weight_flatness", "hidden_flatness"):
        deltas += (inner[f"{column}_so"] - inner[column]).tolist()
        labels += [f"{column} {d}/s{sd}" for d, sd in zip(inner["dataset"], inner["seed"])]
    return [
        _claim("whitening_representation", "Feature whitening keeps the representation from collapsing",
               "Figure 2 (representations)", "effective rank of the representation: BYOL + whitening - BYOL",
               (rep["effective_rank"] - rep["effective_rank_byol"]).tolist(),
               [f"{d}/s{sd}" for d, sd in zip(rep["dataset"], rep["seed"])]),
        _claim("whitening_inside", "Whitening does not protect weights and hidden features as OR does",
               "Figure 2 (weights, hidden features)", "weight / hidden-feature flatness: BYOL + SO - BYOL + whitening",
               deltas, labels),
    ]


def _transfer_claim(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Transfer probes of encoders pretrained with OR against the same runs without."""
    pairs = _transfer_differences(records)
    labels = [f"{target} from {method}/{dataset}/s{seed} {_LABELS.get(reg, reg)}" + ("" if paired else " (unpaired)")
              for target, method, dataset, seed, reg, paired in zip(pairs["target"], pairs["method"],
                                                                    pairs["pretrained on"], pairs["seed"],
                                                                    pairs["regularizer"], pairs["paired"])]
    return _claim("transfer", "OR improves transfer (frozen encoder, linear probe)", "Table 5",
                  "transfer linear top-1: with OR - without (same seed, else the mean without OR)",
                  pairs["delta"].tolist(), labels)


def claims(frame: pd.DataFrame, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The paper's claims, indexed by a short id, each with its numbers and a computed verdict
    (:func:`verdict`, rule :data:`VERDICT_RULE`).

    Every difference compares runs that differ only in the thing the claim is about (same
    method, data set and seed; runs from :func:`select_runs`), signed so that a positive
    difference agrees with the claim; only a transfer probe without a partner of its seed is
    compared with the mean of the probes without OR (marked "unpaired"). ``frame`` is :func:`records_frame` of ``records``. A
    claim without any pair of runs is "no data yet". Ids: ``accuracy_so``, ``accuracy_srip``,
    ``accuracy_knn``, ``seeds``, ``orthogonality``, ``weights``, ``hidden``,
    ``representation``, ``whitening_representation``, ``whitening_inside``, ``transfer``.
    """
    byol10 = frame[(frame["method"] == "byol") & (frame["dataset"] == "cifar10")]
    rows = [
        _or_claim("accuracy_so", frame, "OR (SO) improves linear accuracy across methods and data sets",
                  "Tables 1, 2, 4", "linear top-1: with SO - without (seed 0)", "linear_top1",
                  regularizers=("so",), seed=0),
        _or_claim("accuracy_srip", frame, "OR (SRIP) improves linear accuracy across methods and data sets",
                  "Table 2", "linear top-1: with SRIP - without (seed 0)", "linear_top1", regularizers=("srip",), seed=0),
        _or_claim("accuracy_knn", frame, "OR improves kNN accuracy across methods and data sets", "Tables 2, 4",
                  "kNN top-1: with OR - without (seed 0)", "knn_top1", seed=0),
        _or_claim("seeds", byol10, "BYOL + SO beats BYOL on CIFAR-10 on every seed", "Table 1 (single runs there)",
                  "kNN top-1: with SO - without, same seed", "knn_top1", regularizers=("so",)),
        _or_claim("orthogonality", frame, "OR keeps the weights closer to orthogonal", "the OR objective",
                  "final orthogonality error sum of ||G||_F^2: without OR - with", "or_so_total", sign=-1.0),
        _or_claim("weights", frame, "OR keeps weight spectra from collapsing", "Figure 2 (weights)",
                  "weight flatness (effective rank / size, mean over layers): with OR - without", "weight_flatness"),
        _or_claim("hidden", frame, "OR keeps hidden-feature spectra from collapsing", "Figures 2, 3 (hidden features)",
                  "hidden-feature flatness (mean over stages): with OR - without", "hidden_flatness"),
        _or_claim("representation", frame, "OR keeps the representation from collapsing", "Figure 2 (representations)",
                  "effective rank of the representation: with OR - without", "effective_rank"),
        *_whitening_claims(frame),
        _transfer_claim(records),
    ]
    table = pd.DataFrame(rows).set_index("id")
    table.insert(0, "scale", scale_label(frame))
    return table


def claims_summary(table: pd.DataFrame) -> str:
    """The verdicts of a :func:`claims` table in plain words (Markdown): one bullet per verdict,
    each claim with how many of its differences agree with the paper, then the claims still
    without data. Nothing in it is typed in: every word comes from ``table``."""
    if table.empty:
        return "No claims to report."
    scale = ", ".join(sorted(set(table["scale"].astype(str))))
    lines = [f"At the **{scale}** scale, against the rule *{VERDICT_RULE}*:", ""]
    headings = {SUPPORTED: "Supported", MIXED: "Mixed", NOT_SUPPORTED: "Not supported"}
    for verdict_name, heading in headings.items():
        rows = table[table["verdict"] == verdict_name]
        if rows.empty:
            continue
        items = "; ".join(f"{row['claim'].rstrip('.')} ({row['positive']} of {row['n']})"
                          for _, row in rows.iterrows())
        lines.append(f"* **{heading}**: {items}.")
    waiting = table[table["verdict"] == NO_DATA]
    if not waiting.empty:
        lines.append(f"* **No data yet**: {'; '.join(waiting['claim'])}.")
    return "\n".join(lines)


def styled(table: pd.DataFrame, digits: int = 3) -> Any:
    """``table`` for display: gammas as ``1e-6``, other numbers with ``digits`` decimals, gaps
    as ``-``. Returns a pandas ``Styler`` (the notebook shows it as HTML)."""
    def is_gamma(column: Any) -> bool:
        return "gamma" in (column if isinstance(column, tuple) else (column,))

    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and table[c].dtype != bool]
    formats = {c: (lambda v: "-" if pd.isna(v) else _gamma_text(v)) if is_gamma(c) else
               (lambda v, d=digits: "-" if pd.isna(v) else f"{v:.{d}f}") for c in numeric}
    return table.style.format(formats)


# ----------------------------------------------------------------------------------------------
# Bookkeeping: runs still missing, the OR-overhead benchmark
# ----------------------------------------------------------------------------------------------
def missing_runs(matrix: str | Path, results: str | Path | None = None) -> pd.DataFrame:
    """The runs of a matrix file without a record yet (a dry run of
    :func:`or_core.experiments.run_matrix`; nothing is trained or written). A run whose gamma is
    still to be chosen appears with ``chosen`` in its name. A missing matrix file gives an
    empty table."""
    columns = ["name", "groups"]
    if not Path(matrix).is_file():
        return pd.DataFrame(columns=columns)
    spec = load_matrix(matrix, results)
    groups = {e.name: ", ".join(e.groups) for e in spec.experiments}
    pending = run_matrix(matrix, results=results, dry_run=True)
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
    columns = ["measurement", "variant", "step_s", "step / none (median)", "OR term alone (s)", "(step + OR term) / step"]
    return pd.DataFrame(rows, columns=columns).set_index(["measurement", "variant"])


def overhead_figure(benchmark: Mapping[str, Any], measurement: int = 0) -> Figure:
    """Seconds of the OR term alone per variant (naive and fast SO and SRIP), of one
    measurement of the benchmark, titled with its scale."""
    runs = benchmark.get("runs", [])
    run = runs[measurement] if len(runs) > measurement else {}
    times = {variant: [seconds] for variant, seconds in (run.get("or_only_s") or {}).items()}
    scale = textwrap.fill(str(benchmark.get("scale", "unknown scale")), 60)
    title = f"OR term alone, per step: {run.get('label', 'no data yet')}\n[{scale}]"
    if not times:
        return plots.plot_spectra_panels({}, title)
    return plots.plot_or_cost(times, title, unit="ms")
