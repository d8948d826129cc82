"""The book's figures, all of them: small matplotlib / seaborn functions, each returning its ``Figure``.

Plotting only: every function takes numbers that were computed elsewhere (by
:mod:`or_core.diagnostics`, :mod:`or_core.orthogonality`, a notebook cell, the records' tables
of :mod:`or_core.report` or the run directories of :mod:`or_core.run_dirs`) and draws them.
The figures follow He, Du & Ma (NeurIPS 2024): spectra are sorted in descending order, divided
by their largest value and drawn on a log scale.

* numbers in hand: :func:`plot_spectra`, :func:`plot_curves`,
  :func:`plot_singular_value_trajectories`, :func:`plot_power_iteration`, :func:`plot_or_cost`,
  :func:`plot_spectra_panels`, :func:`plot_dose_response`;
* from result records, each titled with their scale: :func:`figure2`, :func:`spectra_figure`,
  :func:`stage_spectra_figure`, :func:`save_spectra_figure`, :func:`gamma_response`,
  :func:`overhead_figure`;
* from run directories: :func:`history_figure`.

Every figure is drawn at the width the book displays it (:data:`DISPLAY_WIDTH_IN` at
:data:`DPI`, so its PNG is shown at its natural size and no text is below :data:`MIN_FONT_PT`),
and every condition (without OR, SO, SRIP, feature whitening, untrained) keeps one colour, marker
and line style in all of them (:data:`CONDITIONS`, :func:`condition_style`).

Example::

    from or_core import weight_spectra
    from or_core.plots import plot_spectra

    fig = plot_spectra(weight_spectra(backbone), title="ResNet-18 conv weights at init")
    fig.savefig("spectra.png")

Inside a notebook, assign the result (``fig = plot_spectra(...)``): the inline backend shows the
figure once when the cell ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from or_core import report
from or_core.run_dirs import HISTORY_LABELS, RunDir

__all__ = [
    "DISPLAY_WIDTH_IN",
    "DPI",
    "MIN_FONT_PT",
    "MIN_CURVE_POINTS",
    "CONDITIONS",
    "Condition",
    "condition_of",
    "condition_style",
    "figure_context",
    "plot_spectra",
    "plot_curves",
    "plot_singular_value_trajectories",
    "plot_power_iteration",
    "plot_or_cost",
    "plot_spectra_panels",
    "plot_dose_response",
    "gamma_response",
    "paired_figure",
    "spectra_figure",
    "figure2",
    "save_spectra_figure",
    "save_if_changed",
    "stage_spectra_figure",
    "overhead_figure",
    "history_figure",
]

#: Seaborn style of every figure (a white grid, light enough for log-scale decay plots).
STYLE = "whitegrid"
#: Seaborn palette of categorical series (distinguishable with colour-vision deficiencies).
PALETTE = "colorblind"

#: Width of a figure, in inches: the book's content column at 1280 px is about 690 CSS px wide,
#: so at :data:`DPI` a figure is shown at its natural size, never scaled down (which is what made
#: 1,451 px figures' tick labels about 5 px tall).
DISPLAY_WIDTH_IN = 6.7
#: Pixels per inch of every figure (the inline backend saves at the figure's dpi).
DPI = 100
#: The smallest font of any text in a figure, in points: 7.5 pt at 100 dpi is 10.4 px, above
#: the 9 px a reader needs.
MIN_FONT_PT = 7.5
#: A series with fewer points than this is drawn as markers only: two points joined by a line
#: suggest a trend that two measurements cannot show.
MIN_CURVE_POINTS = 3
#: Font sizes of every figure (points). Sizes are fixed when an artist is created, so drawing
#: inside :func:`figure_context` is enough.
RC = {
    "figure.dpi": DPI,
    "font.size": 9.0,
    "axes.titlesize": 9.0,
    "axes.labelsize": 9.0,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "legend.fontsize": 8.0,
    "legend.title_fontsize": 8.0,
    "figure.titlesize": 9.5,
}


#: Line styles cycled with the colours, so that series drawn on top of each other stay visible.
LINESTYLES = ("-", "--", "-.", ":")


class Condition(NamedTuple):
    """How one condition is drawn in every figure."""

    label: str
    color: str
    marker: str
    linestyle: Any


_CB = sns.color_palette(PALETTE).as_hex()
#: One colour, marker and line style per condition, the same in every figure of the book: BYOL +
#: SO is orange wherever it appears. Keys are what :func:`condition_of` finds in a label.
CONDITIONS: dict[str, Condition] = {
    "none": Condition("without OR", _CB[0], "o", "-"),
    "so": Condition("SO", _CB[1], "s", "--"),
    "srip": Condition("SRIP", _CB[2], "^", "-."),
    "whitening": Condition("feature whitening", _CB[4], "D", (0, (1, 1))),
    "untrained": Condition("untrained", "#7f7f7f", "x", ":"),
}
#: Colours of series that are no condition (synthetic spectra, layers, learning rates): the
#: palette without the conditions' colours, so that no such series looks like one.
_OTHER_COLORS = [c for c in _CB if c not in {cond.color for cond in CONDITIONS.values()}]


def condition_of(label: str) -> str | None:
    """The key of :data:`CONDITIONS` a series label names, or ``None``.

    ``"BYOL + SO (gamma 1e-5)"`` -> ``"so"``, ``"byol + SRIP"`` -> ``"srip"``, ``"BYOL +
    whitening"`` -> ``"whitening"``, ``"untrained"`` -> ``"untrained"``; a label naming only a
    method, or saying ``none`` / ``no OR`` / ``without OR``, is ``"none"`` when it names a method
    of :data:`or_core.report.METHOD_LABELS`. Anything else (``"isotropic"``) is ``None``.
    """
    text = label.lower()
    words = set(re.findall(r"[a-z0-9_]+", text))
    if "untrained" in words:
        return "untrained"
    if "whitening" in words:
        return "whitening"
    if "srip" in words:
        return "srip"
    if "so" in words:
        return "so"
    names = {m.lower() for m in report.METHOD_LABELS} | {v.lower() for v in report.METHOD_LABELS.values()}
    if (words & {"none"} or "no or" in text or "without or" in text
            or any(re.search(rf"\b{re.escape(n)}\b", text) for n in names)):
        return "none"
    return None


def condition_style(labels: Sequence[str]) -> list[dict[str, Any]]:
    """``color``, ``marker`` and ``ls`` for each label: the condition's own
    (:data:`CONDITIONS`) when every label names a different condition, else (two labels of
    one condition, or labels that are no condition) the other colours in turn with the
    line styles cycled, so that lines on top of each other stay apart."""
    keys = [condition_of(label) for label in labels]
    if keys and None not in keys and len(set(keys)) == len(keys):
        return [{"color": CONDITIONS[k].color, "marker": CONDITIONS[k].marker, "ls": CONDITIONS[k].linestyle}
                for k in keys]
    colors = _OTHER_COLORS if len(labels) <= len(_OTHER_COLORS) else sns.color_palette(PALETTE, len(labels)).as_hex()
    return [{"color": colors[i % len(colors)], "marker": None, "ls": LINESTYLES[i % len(LINESTYLES)]}
            for i in range(len(labels))]


@contextmanager
def figure_context() -> Iterator[None]:
    """The style and font sizes of every figure of the book (:data:`RC`, :data:`STYLE`)."""
    with plt.rc_context(RC), sns.axes_style(STYLE):
        yield
        interactive = matplotlib.is_interactive()
    # A Jupyter kernel loads its inline backend with the first figure, inside this context, and
    # the backend turns interactive mode on; rc_context's restore would turn it off again, and
    # then no later figure of the notebook would be shown.
    matplotlib.interactive(interactive)


def _width(fraction: float = 1.0) -> float:
    return DISPLAY_WIDTH_IN * fraction


def _plot_series(ax: Axes, x: np.ndarray, y: np.ndarray, style: Mapping[str, Any], label: str, lw: float) -> None:
    """A line through the points, with the condition's markers every few points; markers
    alone when there are fewer than :data:`MIN_CURVE_POINTS` points."""
    n = int(np.size(y))
    marker = style.get("marker") or ("o" if n < MIN_CURVE_POINTS else None)
    every = max(1, n // 8)
    ax.plot(x, y, label=label, color=style["color"], ls=style["ls"] if n >= MIN_CURVE_POINTS else "none",
            lw=lw, marker=marker, markevery=every, markersize=4.5 if n >= MIN_CURVE_POINTS else 6)

#: What the functions accept as numbers: a tensor (any device, with or without grad), an array or a
#: sequence of floats.
ArrayLike = Tensor | np.ndarray | Sequence[float]


def _array(values: ArrayLike) -> np.ndarray:
    """A float64 numpy array from a tensor (any device, with or without grad) or a sequence."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _figure(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The figure and axes to draw on: ``ax``'s own, or a new constrained-layout figure."""
    if ax is not None:
        return ax.get_figure(), ax  # type: ignore[return-value]
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _format(value: float) -> str:
    """A duration without scientific notation: 1,720 / 235 / 54.9 / 3.12 / 0.0412."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _sorted_spectra(values: ArrayLike, normalize: bool) -> np.ndarray:
    """``(k, n)``: each of ``k`` spectra (a 1-D input is one) sorted in descending order and,
    with ``normalize``, divided by its own largest value."""
    v = _array(values)
    v = v.reshape(1, -1) if v.ndim <= 1 else v.reshape(v.shape[0], -1)
    v = -np.sort(-v, axis=1)
    if normalize:
        top = v[:, :1]
        v = np.divide(v, top, out=v.copy(), where=top > 0)
    return v


def _band(ax: Axes, x: np.ndarray, rows: np.ndarray, color: object, log: bool) -> None:
    """The band from the smallest to the largest of ``rows`` (one row per seed) at each x;
    on a log axis a lower end <= 0 is left open."""
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    keep = np.isfinite(lo) & np.isfinite(hi) & ((hi > 0) if log else True)
    lo = np.where(lo > 0, lo, np.nan) if log else lo
    ax.fill_between(x[keep], lo[keep], hi[keep], color=color, alpha=0.2, lw=0)


def plot_spectra(
    spectra: Mapping[str, ArrayLike],
    title: str | None = None,
    *,
    normalize: bool = True,
    xlabel: str | None = None,
    ylabel: str | None = None,
    relative_index: bool = False,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (DISPLAY_WIDTH_IN, 3.4),
) -> Figure:
    """Decay of sorted spectra on a log scale, one line per entry of ``spectra``.

    Each spectrum (eigenvalues or singular values) is sorted in descending order and, with
    ``normalize``, divided by its largest value, as in He, Du & Ma (2024), Figures 2 and 3:
    a flat line at 1 is an isotropic spectrum, a fast decay is dimensional collapse. Zeros
    cannot be drawn on a log axis and are left out.

    An entry of shape ``(k, n)`` holds ``k`` spectra of one series (e.g. one per seed): each
    row is sorted and normalized alone, the line is their mean at each index and a band spans
    the smallest to the largest of them (say so in the caption).

    Args:
        spectra: ``{label: values}``; tensors or arrays of any length, or ``(k, n)`` arrays
            (or lists of ``k`` equally long spectra) for a mean line with a min-max band.
        title: the axes title.
        normalize: divide each spectrum by its largest value.
        xlabel, ylabel: axis labels (defaults: the index, and ``"value / largest"`` or ``"value"``).
        relative_index: put ``i / (len - 1)`` on the x axis, so that spectra of different
            lengths span the same range.
        ax: draw on these axes instead of a new figure.
        figsize: size of a new figure, in inches.
    """
    with figure_context():
        fig, ax = _figure(ax, figsize)
        for (label, values), style in zip(spectra.items(), condition_style(list(spectra))):
            rows = _sorted_spectra(values, normalize)
            v = rows.mean(axis=0)
            x = np.arange(v.size, dtype=np.float64)
            if relative_index and v.size > 1:
                x = x / (v.size - 1)
            keep = v > 0
            _plot_series(ax, x[keep], v[keep], style, label, lw=1.6)
            if rows.shape[0] > 1:
                _band(ax, x, rows, style["color"], log=True)
        ax.set_yscale("log")
        default_xlabel = "index / (count - 1)" if relative_index else "index (sorted, descending)"
        _finish(ax, xlabel or default_xlabel, ylabel or ("value / largest" if normalize else "value"), title,
                bool(spectra))
    return fig


def plot_curves(
    curves: Mapping[str, ArrayLike],
    title: str | None = None,
    *,
    x: ArrayLike | None = None,
    xlabel: str = "step",
    ylabel: str = "value",
    logy: bool = True,
    hlines: Mapping[str, float] | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (DISPLAY_WIDTH_IN, 3.4),
) -> Figure:
    """Several series against a common x (steps by default), with optional labelled levels.

    Args:
        curves: ``{label: values}``; each series is drawn against ``0, 1, 2, ...`` unless ``x``
            is given.
        title: the axes title.
        x: common x values (as long as every series).
        xlabel, ylabel: axis labels.
        logy: log-scale y axis (non-positive values are left out).
        hlines: ``{label: level}``: dashed horizontal lines, e.g. a penalty's floor.
        ax: draw on these axes instead of a new figure.
        figsize: size of a new figure, in inches.
    """
    with figure_context():
        fig, ax = _figure(ax, figsize)
        styles = condition_style([*curves, *(hlines or {})])
        for (label, values), style in zip(curves.items(), styles):
            y = _array(values).ravel()
            xs = np.arange(y.size) if x is None else _array(x).ravel()
            keep = y > 0 if logy else np.isfinite(y)
            _plot_series(ax, xs[keep], y[keep], style, label, lw=1.4)
        for (label, level), style in zip((hlines or {}).items(), styles[len(curves) :]):
            ax.axhline(level, ls=(0, (6, 3)), lw=1.0, color=style["color"], label=label)
        if logy:
            ax.set_yscale("log")
        _finish(ax, xlabel, ylabel, title, bool(curves or hlines))
    return fig


def plot_singular_value_trajectories(
    trajectories: Mapping[str, ArrayLike],
    title: str | None = None,
    *,
    target: float | None = 1.0,
    ncols: int = 2,
    logy: bool = False,
    cmap: str = "viridis",
    panel_size: tuple[float, float] | None = None,
) -> Figure:
    """Every singular value of a weight over the steps of an optimization, one panel per run.

    Each line is one singular value ``s_i`` (the ``i``-th largest at every step), coloured by
    ``i`` from the largest (dark) to the smallest (light), so that a panel shows at a glance
    whether a penalty moves the whole spectrum (SO) or only its extremes (SRIP).

    Args:
        trajectories: ``{panel title: (steps, r) values}``, row ``t`` the singular values after
            ``t`` steps.
        title: the figure title.
        target: a dashed line at this value (the orthogonal weight's ``s_i = 1``); ``None``
            draws none.
        ncols: panels per row.
        logy: log-scale y axes.
        cmap: matplotlib colormap of the singular-value index.
        panel_size: size of one panel, in inches (default: ``ncols`` panels across the display
            width).
    """
    n = max(len(trajectories), 1)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    panel_size = panel_size or (DISPLAY_WIDTH_IN / ncols, 2.5)
    with figure_context():
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
            layout="constrained",
            sharey=not logy,
            squeeze=False,
        )
        colormap = plt.get_cmap(cmap)
        for ax, (label, values) in zip(axes.flat, trajectories.items()):
            s = _array(values)
            s = s.reshape(s.shape[0], -1)
            steps = np.arange(s.shape[0])
            r = s.shape[1]
            for i in range(r):
                ax.plot(steps, s[:, i], color=colormap(0.9 * i / max(r - 1, 1)), lw=0.8, alpha=0.8)
            if target is not None:
                ax.axhline(target, color="black", ls="--", lw=1.0)
            if logy:
                ax.set_yscale("log")
            ax.set_title(label, fontsize="medium")
            ax.set_xlabel("step")
            ax.set_ylabel("singular value")
        for ax in list(axes.flat)[len(trajectories) :]:
            ax.remove()  # an empty grid cell, not an empty frame
        if title:
            fig.suptitle(title)
    return fig


def plot_power_iteration(
    errors: Mapping[str, ArrayLike],
    title: str | None = None,
    *,
    x: ArrayLike | None = None,
    xlabel: str = "power iterations",
    ylabel: str = "relative error of the estimate",
    ax: Axes | None = None,
    figsize: tuple[float, float] = (DISPLAY_WIDTH_IN, 3.4),
) -> Figure:
    """Convergence of power-iteration estimates: relative error against iterations, log scale.

    A series of shape ``(iterations,)`` is drawn as a line; one of shape ``(starts, iterations)``
    (one row per random start vector) as its median with a band from the smallest to the
    largest error. Errors of exactly zero (converged to the last bit) are left out.

    Args:
        errors: ``{label: errors}``, e.g. ``|estimate - sigma| / sigma``.
        title: the axes title.
        x: x values shared by all series (default ``0, 1, 2, ...``).
        xlabel, ylabel: axis labels.
        ax: draw on these axes instead of a new figure.
        figsize: size of a new figure, in inches.
    """
    with figure_context():
        fig, ax = _figure(ax, figsize)
        for (label, values), style in zip(errors.items(), condition_style(list(errors))):
            color = style["color"]
            e = _array(values)
            e = e.reshape(1, -1) if e.ndim == 1 else e.reshape(e.shape[0], -1)
            xs = np.arange(e.shape[1]) if x is None else _array(x).ravel()
            median = np.median(e, axis=0)
            keep = median > 0
            ax.plot(xs[keep], median[keep], color=color, lw=1.6, label=label)
            if e.shape[0] > 1:
                lo, hi = e.min(axis=0), e.max(axis=0)
                band = hi > 0
                lo = np.where(lo > 0, lo, np.nan)
                ax.fill_between(xs[band], lo[band], hi[band], color=color, alpha=0.2, lw=0)
        ax.set_yscale("log")
        _finish(ax, xlabel, ylabel, title, bool(errors))
    return fig


def plot_or_cost(
    times: Mapping[str, ArrayLike],
    title: str | None = None,
    *,
    unit: str = "ms",
    log: bool = False,
    annotate: bool = True,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Seconds per call of each variant: horizontal bars at the median, whiskers from min to max.

    Args:
        times: ``{variant: seconds per repeat}`` (one value or several).
        title: the axes title.
        unit: ``"s"``, ``"ms"`` or ``"us"``: the unit of the axis and the labels.
        log: log-scale axis. Off by default: a bar's length on a log axis starts from an
            arbitrary origin, so bars of different lengths cannot be compared by eye.
        annotate: write each median next to its bar.
        ax: draw on these axes instead of a new figure.
        figsize: size of a new figure (default: grows with the number of variants).
    """
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    labels = list(times)
    samples = [_array(times[k]).ravel() * scale for k in labels]
    medians = np.array([np.median(s) for s in samples])
    lows = medians - np.array([s.min() for s in samples])
    highs = np.array([s.max() for s in samples]) - medians
    with figure_context():
        fig, ax = _figure(ax, figsize or (DISPLAY_WIDTH_IN, 0.4 * len(labels) + 1.3))
        y = np.arange(len(labels))
        colors = [style["color"] for style in condition_style(labels)]
        ax.barh(y, medians, xerr=[lows, highs], color=colors, capsize=3, height=0.6)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(f"time per call ({unit}; median, whiskers min to max)")
        if annotate:
            for yi, m, hi in zip(y, medians, highs):
                x_text = (m + hi) * 1.08 if log else m + hi
                ax.text(x_text, yi, f" {_format(m)} {unit}", va="center", fontsize=RC["legend.fontsize"])
            ax.set_xlim(right=ax.get_xlim()[1] * (3.0 if log else 1.2))
        if title:
            ax.set_title(title)
    return fig


# ----------------------------------------------------------------------------------------------
# Figures of result records (used by or_core.report)
# ----------------------------------------------------------------------------------------------
def _finish(ax: Axes, xlabel: str, ylabel: str, title: str | None, legend: bool) -> None:
    """Axis labels, the title when given, and a small legend when anything is labelled."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend()


def _note(ax: Axes, text: str) -> None:
    """A centred grey note on an otherwise empty panel (e.g. ``"no data yet"``)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_spectra_panels(
    panels: Mapping[str, Mapping[str, ArrayLike]],
    title: str | None = None,
    *,
    ncols: int = 2,
    empty: str = "no data yet",
    panel_size: tuple[float, float] | None = None,
) -> Figure:
    """Several :func:`plot_spectra` panels side by side, one legend for all.

    Args:
        panels: ``{panel title: {line label: values}}``; every panel draws its spectra sorted,
            divided by the largest value, on a log scale. A panel without spectra shows
            ``empty``; with no panels at all the figure is one panel saying ``empty``.
        title: the figure title.
        ncols: panels per row (two: four panels side by side at the display width would be
            too narrow to read, so they go 2x2).
        empty: the note of an empty panel.
        panel_size: size of one panel, in inches (default: ``ncols`` panels across the display
            width).
    """
    items = list(panels.items()) or [("", {})]
    ncols = max(1, min(ncols, len(items)))
    nrows = -(-len(items) // ncols)
    panel_size = panel_size or (DISPLAY_WIDTH_IN / ncols, 2.3)
    with figure_context():
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.6),
            layout="constrained", squeeze=False,
        )
        labels: dict[str, object] = {}
        for ax, (name, spectra) in zip(axes.flat, items):
            if not spectra:
                _note(ax, empty)
                ax.set_title(name, fontsize="medium")
                continue
            plot_spectra(spectra, name or None, ax=ax)
            ax.title.set_fontsize("medium")
            for line in ax.get_lines():
                labels.setdefault(line.get_label(), line)
            if ax.get_legend() is not None:
                ax.get_legend().remove()
        for ax in list(axes.flat)[len(items) :]:
            ax.remove()  # an empty grid cell, not an empty frame
        if labels:
            fig.legend(list(labels.values()), list(labels), loc="outside lower center",
                       ncols=min(len(labels), 2))
        if title:
            fig.suptitle(title)
    return fig


def plot_dose_response(
    series: Mapping[str, tuple[ArrayLike, ArrayLike, Sequence[bool]]],
    title: str | None = None,
    *,
    baselines: Mapping[str, float] | None = None,
    chosen: Mapping[str, float] | None = None,
    spread: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
    baseline_spread: Mapping[str, tuple[float, float]] | None = None,
    xlabel: str = "gamma",
    ylabel: str = "value",
    empty: str = "no data yet",
    ax: Axes | None = None,
    figsize: tuple[float, float] = (DISPLAY_WIDTH_IN, 3.4),
) -> Figure:
    """A metric against a regularization weight on a log x axis, one line per regularizer.

    Points inside the tuning grid are filled, points outside it are hollow; a chosen value is
    ringed; baselines (the run without regularization) are dashed horizontal lines. Where a
    point or a baseline is the mean of several runs (seeds), ``spread`` / ``baseline_spread``
    give the range to draw around it: a vertical bar at the point, a band along the baseline
    (say in the caption what the range is, e.g. min to max over seeds).

    Args:
        series: ``{label: (gammas, values, outside)}``, ``outside[i]`` true for a point outside
            the grid.
        title: the axes title.
        baselines: ``{label: value}``: dashed horizontal lines.
        chosen: ``{series label: gamma}``: the point to ring.
        spread: ``{series label: (lows, highs)}``, aligned with the series' gammas; a bar where
            ``high > low``.
        baseline_spread: ``{baseline label: (low, high)}``: a band where ``high > low``.
        xlabel, ylabel: axis labels.
        empty: the note of a panel with nothing to draw.
        ax: draw on these axes instead of a new figure.
        figsize: size of a new figure, in inches.
    """
    with figure_context():
        fig, ax = _figure(ax, figsize)
        if not series and not baselines:
            _note(ax, empty)
        styles = condition_style([*series, *(baselines or {})])
        colors = [style["color"] for style in styles]
        for i, ((label, (gammas, values, outside)), color) in enumerate(zip(series.items(), colors)):
            g, v = _array(gammas).ravel(), _array(values).ravel()
            out = np.asarray(outside, dtype=bool).ravel()
            order = np.argsort(g)
            g, v, out = g[order], v[order], out[order]
            ax.plot(g, v, color=color, ls=styles[i]["ls"] if len(g) >= MIN_CURVE_POINTS else "none", lw=1.4,
                    label=label)
            if spread and label in spread:
                lo, hi = (_array(a).ravel()[order] for a in spread[label])
                bar = hi > lo
                if bar.any():
                    ax.errorbar(g[bar], v[bar], yerr=[v[bar] - lo[bar], hi[bar] - v[bar]], fmt="none", ecolor=color,
                                elinewidth=1.2, capsize=4, zorder=2)
            ax.scatter(g[~out], v[~out], color=color, s=36, zorder=3)
            if out.any():
                ax.scatter(g[out], v[out], facecolors="white", edgecolors=color, s=36, zorder=3)
            if chosen and label in chosen:
                pick = np.isclose(g, chosen[label], rtol=1e-9)
                ax.scatter(g[pick], v[pick], facecolors="none", edgecolors="black", s=140, lw=1.2, zorder=4)
        for (label, level), color in zip((baselines or {}).items(), colors[len(series) :]):
            ax.axhline(level, ls=(0, (6, 3)), lw=1.0, color=color, label=label)
            low, high = (baseline_spread or {}).get(label, (level, level))
            if high > low:
                ax.axhspan(low, high, color=color, alpha=0.15, lw=0)
        if series:
            ax.set_xscale("log")
        _finish(ax, xlabel, ylabel, title, bool(series or baselines))
    return fig


# ----------------------------------------------------------------------------------------------
# Figures of result records (what is drawn: or_core.report)
# ----------------------------------------------------------------------------------------------
def gamma_response(
    frame: pd.DataFrame,
    method: str = "byol",
    dataset: str = "cifar10",
    metrics: Sequence[str] = ("val_knn_top1", "knn_top1"),
) -> Figure:
    """Dose-response of gamma (:func:`or_core.report.gamma_response_panels` of a
    :func:`~or_core.report.records_frame`): each metric against gamma (log scale), one line per
    regularizer, paper-grid gammas filled, gammas outside the grid hollow, the chosen gamma
    ringed, the run without OR as a dashed line. One panel per metric.

    Every seed recorded counts: a point (and the dashed line) is the mean over the seeds of
    that gamma, with a bar (a band) from the smallest to the largest of them where there are
    several, as the title says."""
    panels, title = report.gamma_response_panels(frame, method, dataset, metrics)
    with figure_context():
        fig, axes = plt.subplots(len(metrics), 1, figsize=(DISPLAY_WIDTH_IN, 3.0 * len(metrics) + 0.8),
                                 layout="constrained", squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            plot_dose_response(**panel, ax=ax)
        fig.suptitle(title)
    return fig


def _arm_color(regularizer: str, i: int) -> str:
    """A regularizer's colour: its condition's (:data:`CONDITIONS`), else one of the others."""
    return CONDITIONS[regularizer].color if regularizer in CONDITIONS else _OTHER_COLORS[i % len(_OTHER_COLORS)]


def paired_figure(
    frame: pd.DataFrame,
    method: str = "byol",
    dataset: str = "cifar10",
    metric: str = "knn_top1",
) -> Figure:
    """Paired comparisons over seeds of one method (:func:`or_core.report.paired_values` and
    :func:`~or_core.report.paired_effects` of a :func:`~or_core.report.records_frame`).

    Left: ``metric`` of every run, one grey line per seed joining its arms (without OR, SO,
    SRIP, ...), so that a reader sees both the spread between seeds and how each seed moves.
    Right: each regularizer's mean paired difference (with OR - without, same seed) with its
    paired-t 95% interval; a hollow point has fewer than two pairs and no interval.
    """
    values = report.paired_values(frame, method, dataset, metric)
    effects = report.paired_effects(values)
    effects = effects[effects["seeds"] > 0].reset_index(drop=True)  # an arm no seed pairs: nothing to draw
    measure = report._METRIC_NAMES.get(metric, metric)
    name = f"{report.method_label(method)}, {report.dataset_label(dataset)}"
    with figure_context():
        fig, (left, right) = plt.subplots(1, 2, figsize=(DISPLAY_WIDTH_IN, 3.4), layout="constrained",
                                          gridspec_kw={"width_ratios": [3, 2]})
        if values.empty:
            _note(left, "no data yet")
            _note(right, "no data yet")
        else:
            arms = list(values.columns)
            x = np.arange(len(arms))
            for seed, row in values.iterrows():
                have = row.notna().to_numpy()
                left.plot(x[have], row.to_numpy()[have], color="0.6", lw=0.8, zorder=1)
            for i, arm in enumerate(arms):
                left.scatter(np.full(len(values), x[i]), values[arm], color=_arm_color(arm, i), s=24, zorder=2)
            left.set_xticks(x, [report.REGULARIZER_LABELS.get(a, a) for a in arms])
            paired = int((values.notna().sum(axis=1) >= 2).sum())  # seeds with two arms or more: a line
            _finish(left, "", measure, f"{report._plural(len(values), 'seed')}, {paired} paired (grey lines)", False)
            if effects.empty:
                _note(right, "no pair of runs yet\n(same seed, with\nand without OR)")
            else:
                xe = np.arange(len(effects))
                for i, row in effects.iterrows():
                    color = _arm_color(row["regularizer"], i + 1)
                    if row["seeds"] >= 2:
                        right.errorbar(xe[i], row["effect"], yerr=[[row["effect"] - row["ci_low"]],
                                                                   [row["ci_high"] - row["effect"]]],
                                       fmt="o", color=color, capsize=4, elinewidth=1.2)
                    else:
                        right.scatter(xe[i], row["effect"], facecolors="white", edgecolors=color, s=36, zorder=3)
                right.axhline(0.0, color="0.3", lw=0.8, ls=(0, (6, 3)))
                right.set_xticks(xe, [f"{label}\n({report._plural(n, 'pair')})"
                                      for label, n in zip(effects["label"], effects["seeds"])])
                _finish(right, "", "with OR - without (same seed)", "mean paired difference, 95% CI", False)
        fig.suptitle(f"{name}: paired seeds {report._scale_tag(frame)}")
    return fig


def spectra_figure(
    records: Sequence[Mapping[str, Any]],
    kind: str = "weights",
    runs: report.Runs | None = None,
    layers: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Figure 2 analogue for one kind of spectrum, one line per run (default
    :func:`or_core.report.figure2_runs`): normalized eigenvalues, descending, log scale; a run
    with several seeds is their mean with a band from the smallest to the largest value (the
    title says so).

    ``kind``: ``"weights"`` (Gram spectra; one panel per layer of ``layers``, default the last
    convolution of each stage), ``"hidden"`` (covariance of each stage's pooled output; one
    panel per stage) or ``"representation"`` (one panel). The title states the records' scale.
    ``runs``: ``{label: record}`` or ``{label: [records of its seeds]}``
    (:func:`or_core.report.spectra_panels`).
    """
    panels, title = report.spectra_panels(records, kind, runs, layers, title)
    return plot_spectra_panels(panels, title)


def figure2(
    records: Sequence[Mapping[str, Any]],
    runs: report.Runs | None = None,
    weight_layer: str | None = None,
    hidden_layer: str | None = None,
    title: str | None = None,
) -> Figure:
    """The main Figure 2 analogue in three panels: a weight's Gram spectrum, a hidden stage's
    feature spectrum and the representation's, for BYOL, BYOL + whitening and BYOL + OR.

    ``weight_layer`` defaults to the last convolution of the last stage (``layer4.1.conv2``),
    ``hidden_layer`` to the last stage but one (``layer3``), whose output is not the
    representation itself. A run with several seeds is drawn as their mean with a min-max
    band (:func:`or_core.report.figure2_panels`)."""
    panels, title = report.figure2_panels(records, runs, weight_layer, hidden_layer, title)
    return plot_spectra_panels(panels, title)


def save_spectra_figure(
    records: Sequence[Mapping[str, Any]],
    fallback: Sequence[Mapping[str, Any]],
    path: str | Path,
    expected: str = "cpu-small",
    dpi: int = 130,
) -> Figure:
    """:func:`figure2` of ``records`` (of scale ``expected``) saved as ``path``, the README's
    figure. When ``records`` hold none of its runs, ``fallback``'s are drawn instead and the
    title says so (:func:`or_core.report.spectra_fallback`).

    The file is committed and rewritten at every build of the book, so it is left as it is
    when it already holds the same pixels (and saved without the PNG's "Software" entry, which
    names matplotlib's version): a build where nothing changed leaves the repository clean."""
    records, title = report.spectra_fallback(records, fallback, expected)
    fig = figure2(records, title=title)
    save_if_changed(fig, path, dpi=dpi)
    return fig


def save_if_changed(fig: Figure, path: str | Path, dpi: int = DPI) -> bool:
    """Save ``fig`` as the PNG ``path`` unless the file there already shows the same pixels;
    returns whether it wrote. No "Software" metadata is written, so the bytes depend on the
    pixels and the PNG encoder only."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    data = buffer.getvalue()
    path = Path(path)
    if path.is_file():
        old = path.read_bytes()
        if old == data:
            return False
        with Image.open(io.BytesIO(old)) as before, Image.open(io.BytesIO(data)) as after:
            if before.size == after.size and before.convert("RGBA").tobytes() == after.convert("RGBA").tobytes():
                return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def stage_spectra_figure(
    records: Sequence[Mapping[str, Any]], runs: report.Runs | None = None, title: str | None = None
) -> Figure:
    """Figure 3 analogue: the hidden-feature spectrum of each ResNet stage (one panel per
    stage), without OR, with SO and with SRIP (default :func:`or_core.report.figure3_runs`,
    every seed: mean and min-max band). The last stage's pooled output is the representation
    itself."""
    runs = report.figure3_runs(records) if runs is None else runs
    return spectra_figure(records, "hidden", runs=runs, title=report.stage_spectra_title(runs, title))


def overhead_figure(benchmark: Mapping[str, Any], measurement: int = 0) -> Figure:
    """Seconds of the OR term alone per variant (naive and fast SO and SRIP), of one
    measurement of the benchmark, titled with its scale (:func:`or_core.report.overhead_times`)."""
    times, title = report.overhead_times(benchmark, measurement)
    if not times:
        return plot_spectra_panels({}, title)
    return plot_or_cost(times, title, unit="ms")


# ----------------------------------------------------------------------------------------------
# Figures of run directories (read by or_core.run_dirs)
# ----------------------------------------------------------------------------------------------
def history_figure(
    runs: Sequence[RunDir],
    metrics: Sequence[str] = ("effective_rank", "ssl_loss"),
    title: str | None = None,
) -> Figure:
    """Per-epoch curves of ``runs``, one panel per metric of ``metrics`` (keys of
    ``metrics.jsonl``, see :data:`or_core.run_dirs.HISTORY_LABELS`), one line per run, against
    the epoch. ``title`` goes above the panels (say the scale there). Without runs, each panel
    says "no data yet"."""
    unknown = [m for m in metrics if m not in HISTORY_LABELS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(HISTORY_LABELS)}")
    ncols = min(len(metrics), 2)
    with figure_context():
        fig, axes = plt.subplots(-(-len(metrics) // ncols), ncols,
                                 figsize=(DISPLAY_WIDTH_IN, 3.2 * -(-len(metrics) // ncols) + 0.6),
                                 squeeze=False, layout="constrained")
        styles = condition_style([run.label for run in runs])
        for ax, metric in zip(axes.flat, metrics):
            ax.set_title(HISTORY_LABELS[metric])
            if not runs:
                ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
                continue
            for run, style in zip(runs, styles):
                values = np.array([e.get(metric, float("nan")) for e in run.history], dtype=np.float64)
                _plot_series(ax, np.arange(1, len(values) + 1), values, style, run.label, lw=1.4)
            ax.set_xlabel("epoch")
            ax.set_ylabel(HISTORY_LABELS[metric])
            ax.legend()
        if title:
            fig.suptitle(title)
    return fig
