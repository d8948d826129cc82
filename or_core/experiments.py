"""Experiment matrices: a YAML list of runs, each trained once and recorded in ``results/``.

A matrix file (``configs/matrix_cpu.yaml``) names a profile, a results folder and entries;
an entry's list values expand to every combination::

    profile: cpu
    results: results/matrix_cpu
    choose_gamma: {method: byol, dataset: cifar10, metric: val_knn_top1,
                   grids: {so: [1e-5, 1e-6, 1e-7], srip: [1e-3, 1e-4, 1e-5]}}
    runs:
      - {group: gamma_grid, method: byol, dataset: cifar10, regularizer: so, gamma: [1e-5, 1e-6, 1e-7]}
      - {group: methods, method: [simclr, vicreg], dataset: [cifar10, cifar100],
         regularizer: [none, so, srip], gamma: chosen}

``gamma: chosen`` takes, per regularizer, the gamma of the paper's grid with the best
validation kNN (``val_knn_top1``: held-out *training* images, never the test split) among the
``choose_gamma`` runs, seed 0; those runs must be in the matrix, and run first. Entries with
``outside_paper_grid: true`` are shown, marked, and never chosen. ``transfer: [names]`` adds
linear probes of the final encoder on other data sets.

:func:`run_matrix` trains every run whose record is missing (a run interrupted half-way
resumes from its checkpoint in the work folder), then writes its record: config, summary,
per-epoch history, collapse spectra (:func:`or_core.records.collapse_spectra`), transfer probes,
the gamma choice and provenance. Runs already recorded are skipped, so the one command both
starts and resumes the matrix::

    python -m or_core matrix configs/matrix_cpu.yaml --jobs 2
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from or_core.checkpoint import load_checkpoint
from or_core.config import PretrainConfig, resolve_config
from or_core.data import load_split, load_split_at_most
from or_core.evaluate import extract_features, knn_accuracy, linear_probe_accuracy
from or_core.records import collapse_spectra, load_records, provenance, scale_of, write_record
from or_core.train import CHECKPOINT_FILE, build_run, pretrain, read_metrics

__all__ = ["Experiment", "Matrix", "load_matrix", "run_name", "choose_gamma", "resolve_chosen", "run_experiment", "run_matrix"]

CHOSEN = "chosen"
#: Keys of a matrix entry that are not config fields.
ENTRY_KEYS = ("group", "transfer", "outside_paper_grid", "note")


@dataclass(frozen=True)
class Experiment:
    """One run of a matrix: config overrides on top of the matrix's profile and base."""

    name: str
    overrides: dict[str, Any]
    groups: tuple[str, ...]
    transfer: tuple[str, ...] = ()
    outside_paper_grid: bool = False
    gamma_choice: dict[str, Any] | None = None

    @property
    def needs_chosen_gamma(self) -> bool:
        return self.overrides.get("gamma") == CHOSEN

    def with_gamma(self, choice: dict[str, Any]) -> Experiment:
        """This run with the chosen gamma filled in, renamed after it."""
        overrides = {**self.overrides, "gamma": choice["gamma"]}
        return dataclasses.replace(self, name=run_name(overrides), overrides=overrides, gamma_choice=choice)


@dataclass
class Matrix:
    """A parsed matrix file."""

    path: Path
    profile: str
    results: Path
    base: dict[str, Any]
    choose: dict[str, Any]
    experiments: list[Experiment] = field(default_factory=list)

    def record_path(self, experiment: Experiment) -> Path:
        return self.results / f"{experiment.name}.json"


def _format_gamma(gamma: Any) -> str:
    if gamma is None:
        return "default"
    if gamma == CHOSEN:
        return CHOSEN
    return f"{float(gamma):.0e}".replace("e-0", "e-").replace("e+0", "e")


def run_name(overrides: dict[str, Any]) -> str:
    """``<method>-<dataset>-<regularizer>[-<gamma>]-s<seed>``, e.g. ``byol-cifar10-so-1e-6-s0``."""
    regularizer = overrides.get("regularizer", "none")
    parts = [overrides.get("method", "byol"), Path(str(overrides.get("dataset", "cifar10"))).name, regularizer]
    if regularizer != "none":
        parts.append(_format_gamma(overrides.get("gamma")))
    parts.append(f"s{overrides.get('seed', 0)}")
    return "-".join(str(p) for p in parts)


def _expand(entry: dict[str, Any], base: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every combination of an entry's list values, as (config overrides, entry extras)."""
    extras = {k: entry[k] for k in ENTRY_KEYS if k in entry}
    fields = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    keys = list(fields)
    values = [v if isinstance(v, list) else [v] for v in fields.values()]
    out = []
    for combo in itertools.product(*values):
        overrides = {"method": "byol", "dataset": "cifar10", "regularizer": "none", "seed": 0}
        overrides.update({**base, **dict(zip(keys, combo, strict=True))})
        if overrides.get("regularizer", "none") == "none":
            overrides.pop("gamma", None)
        out.append((overrides, extras))
    return out


def load_matrix(path: str | Path, results: str | Path | None = None) -> Matrix:
    """Parse a matrix file; identical runs named by several entries are merged (their groups
    and transfer sets joined). Unknown config fields are an error naming the entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"matrix file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - {"name", "profile", "results", "base", "choose_gamma", "runs"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    base = spec.get("base") or {}
    valid = {f.name for f in dataclasses.fields(PretrainConfig)}
    merged: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(spec.get("runs") or []):
        bad = sorted(set(entry) - valid - set(ENTRY_KEYS))
        if bad:
            raise ValueError(f"{path}: run entry {i} has unknown fields {bad}; valid: {sorted(valid)}")
        for overrides, extras in _expand(entry, base):
            name = run_name(overrides)
            slot = merged.setdefault(name, {"overrides": overrides, "groups": [], "transfer": [], "outside": False})
            if slot["overrides"] != overrides:
                raise ValueError(f"{path}: two entries name run {name} with different settings")
            group = extras.get("group", "ungrouped")
            if group not in slot["groups"]:
                slot["groups"].append(group)
            for t in extras.get("transfer", []) or []:
                if t not in slot["transfer"]:
                    slot["transfer"].append(t)
            slot["outside"] |= bool(extras.get("outside_paper_grid", False))
    experiments = [
        Experiment(name, s["overrides"], tuple(s["groups"]), tuple(s["transfer"]), s["outside"])
        for name, s in merged.items()
    ]
    if results is not None:  # given by the caller: relative to the working directory
        results_dir = Path(results)
    else:  # the file's own: relative to the repository that holds configs/
        results_dir = Path(spec.get("results", "results/matrix"))
        if not results_dir.is_absolute() and path.parent.name == "configs":
            results_dir = path.resolve().parents[1] / results_dir
    return Matrix(path, spec.get("profile", "cpu"), results_dir, base, spec.get("choose_gamma") or {}, experiments)


# ----------------------------------------------------------------------------------------------
# Choosing gamma on the validation split
# ----------------------------------------------------------------------------------------------
def choose_gamma(records: Sequence[dict[str, Any]], regularizer: str, choose: dict[str, Any]) -> dict[str, Any]:
    """The paper-grid gamma of ``regularizer`` with the best validation metric.

    Candidates are the records of ``choose``'s method and data set, seed 0, inside the paper's
    grid; all of the grid must be recorded. Returns ``{"gamma", "metric", "candidates"}``.
    """
    grid = [float(g) for g in choose["grids"][regularizer]]
    metric = choose.get("metric", "val_knn_top1")
    found: dict[float, float] = {}
    for record in records:
        cfg, summary = record["config"], record["summary"]
        if (
            cfg["method"] == choose["method"] and Path(cfg["dataset"]).name == choose["dataset"]
            and cfg["regularizer"] == regularizer and cfg["seed"] == 0 and not record.get("outside_paper_grid")
        ):
            gamma = float(summary["gamma"])
            if any(math.isclose(gamma, g, rel_tol=1e-9) for g in grid):
                found[gamma] = summary[metric]
    missing = [g for g in grid if not any(math.isclose(g, f, rel_tol=1e-9) for f in found)]
    if missing:
        raise RuntimeError(
            f"gamma for {regularizer} cannot be chosen yet: no record of {choose['method']} on "
            f"{choose['dataset']} with gamma {missing}; run the grid first"
        )
    best = max(grid, key=lambda g: (found[g], -g))
    return {"gamma": best, "metric": metric, "candidates": {f"{g:g}": found[g] for g in grid}}


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _transfer(run, datasets: Sequence[str]) -> dict[str, dict[str, float]]:
    """Linear probe (and kNN) of the frozen encoder on other data sets, at the training size."""
    cfg = run.cfg
    root = Path(os.path.expanduser(cfg.data_root))
    size = run.image_size
    out = {}
    for name in datasets:
        train = load_split_at_most(name, "train", root, size, cfg.eval_train_subset, cfg.seed)
        test = load_split_at_most(name, "test", root, size, cfg.eval_test_subset, cfg.seed)
        backbone = run.method.backbone
        f_train = extract_features(backbone, train.images, run.mean, run.std, device=run.device)
        f_test = extract_features(backbone, test.images, run.mean, run.std, device=run.device)
        with torch.enable_grad():
            linear = linear_probe_accuracy(
                f_train, train.labels, f_test, test.labels, train.num_classes, epochs=cfg.linear_epochs, seed=cfg.seed
            )
        knn = knn_accuracy(f_train, train.labels, f_test, test.labels, train.num_classes, cfg.knn_k, cfg.knn_t)
        out[Path(name).name] = {
            "linear_top1": linear["top1"], "linear_top5": linear["top5"], "knn_top1": knn["top1"],
            "train_images": len(train), "test_images": len(test),
        }
    return out


def run_experiment(matrix: Matrix, experiment: Experiment, work_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Train (or resume) one run in ``work_dir/<name>``, then write and return its record."""
    if experiment.needs_chosen_gamma:
        raise ValueError(f"{experiment.name}: choose its gamma first (Experiment.with_gamma)")
    overrides = dict(experiment.overrides)
    cfg = resolve_config(matrix.profile, overrides={**overrides, "profile": matrix.profile})
    out = Path(work_dir) / experiment.name
    start = time.perf_counter()
    summary = pretrain(cfg, out, progress=progress)
    run = build_run(cfg)
    state = load_checkpoint(out / CHECKPOINT_FILE)
    run.method.load_state_dict(state["method"])
    test = load_split(cfg.dataset, "test", Path(os.path.expanduser(cfg.data_root)), cfg.image_size, cfg.eval_test_subset, cfg.seed)
    history = read_metrics(out)
    record = {
        "name": experiment.name,
        "matrix": matrix.path.name,
        "groups": list(experiment.groups),
        "outside_paper_grid": experiment.outside_paper_grid,
        "scale": scale_of(matrix.profile),
        "config": cfg.to_dict(),
        "summary": summary,
        "gamma_choice": experiment.gamma_choice,
        "history": history,
        "collapse": collapse_spectra(run.method.backbone, test.images, run.mean, run.std, device=run.device),
        "transfer": _transfer(run, experiment.transfer) if experiment.transfer else {},
        "provenance": provenance(
            ["python", "-m", "or_core", "matrix", str(matrix.path)], wall_time_s=summary["wall_time_s"]
        ),
    }
    record["provenance"]["record_wall_time_s"] = round(time.perf_counter() - start, 1)
    write_record(matrix.record_path(experiment), record)
    return record


# ----------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------
def _merge_groups(matrix: Matrix, experiment: Experiment, work_dir: Path) -> None:
    """A chosen-gamma run that the grid already made: add its groups, the gamma choice and any
    transfer probe it asks for to that record (from the run's final checkpoint in
    ``work_dir``) instead of training it again."""
    path = matrix.record_path(experiment)
    record = json.loads(path.read_text())
    groups = list(dict.fromkeys([*record["groups"], *experiment.groups]))
    missing = [t for t in experiment.transfer if Path(t).name not in (record.get("transfer") or {})]
    if groups == record["groups"] and record.get("gamma_choice") == experiment.gamma_choice and not missing:
        return
    record["groups"], record["gamma_choice"] = groups, experiment.gamma_choice
    if missing:
        cfg = resolve_config(matrix.profile, overrides={**experiment.overrides, "profile": matrix.profile})
        run = build_run(cfg)
        state = load_checkpoint(work_dir / experiment.name / CHECKPOINT_FILE)
        if state is None:
            raise FileNotFoundError(
                f"{experiment.name}: transfer probes {missing} need the run's checkpoint in {work_dir}"
            )
        run.method.load_state_dict(state["method"])
        record["transfer"] = {**(record.get("transfer") or {}), **_transfer(run, missing)}
    # The training's provenance stays; what this merge added has its own (code, date, command).
    merged = {"added": {"groups": experiment.groups, "transfer": missing}, **provenance()}
    record["provenance"]["merges"] = [*record["provenance"].get("merges", []), merged]
    write_record(path, record)


def resolve_chosen(matrix: Matrix, experiments: Sequence[Experiment]) -> list[Experiment]:
    """``experiments`` with every ``gamma: chosen`` replaced by the gamma the records choose."""
    records = load_records(matrix.results) if matrix.results.is_dir() else []
    choices: dict[str, dict[str, Any]] = {}
    out = []
    for e in experiments:
        if e.needs_chosen_gamma:
            reg = e.overrides.get("regularizer")
            if reg not in choices:
                choices[reg] = choose_gamma(records, reg, matrix.choose)
            e = e.with_gamma(choices[reg])
        out.append(e)
    return out


def run_matrix(
    path: str | Path,
    work_dir: str | Path | None = None,
    jobs: int = 1,
    groups: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    results: str | Path | None = None,
    dry_run: bool = False,
    rerun: bool = False,
) -> list[str]:
    """Run every pending experiment of the matrix at ``path``; returns the names it ran (or
    would run, with ``dry_run``).

    Runs that need no chosen gamma go first; then the gamma is chosen from their records and
    the rest run (a chosen run the grid already made is not trained again: its record gains
    the group). ``jobs > 1`` trains that many runs at once, each in its own process
    (``python -m or_core matrix --only NAME``, ``cores / jobs`` torch threads), the next
    starting when one ends; each phase waits for all of its runs. ``only``
    restricts the matrix to runs with these names (chosen runs by their resolved names).
    ``rerun`` trains the selected runs again and overwrites their records (give it a fresh
    ``work_dir``: a finished run directory is returned as it is).
    """
    matrix = load_matrix(path, results)
    work_dir = Path(work_dir).expanduser() if work_dir else Path("~/.cache/or_core/matrix").expanduser() / matrix.path.stem
    wanted = [e for e in matrix.experiments if groups is None or set(e.groups) & set(groups)]
    ran: list[str] = []
    for chosen_phase in (False, True):
        phase = [e for e in wanted if e.needs_chosen_gamma == chosen_phase]
        if chosen_phase and phase:
            if dry_run and any(not matrix.record_path(e).is_file() for e in wanted if not e.needs_chosen_gamma):
                ran += [e.name for e in phase]
                continue
            try:
                phase = resolve_chosen(matrix, phase)
            except RuntimeError:
                if only is None:
                    raise
                continue  # a worker of the first phase: its runs are all in that phase
            for e in phase:
                if matrix.record_path(e).is_file() and not dry_run and not rerun:
                    _merge_groups(matrix, e, work_dir)
        phase = [e for e in phase if (rerun or not matrix.record_path(e).is_file()) and (only is None or e.name in only)]
        phase = list({e.name: e for e in phase}.values())
        if not phase:
            continue
        if dry_run:
            ran += [e.name for e in phase]
        elif jobs > 1 and len(phase) > 1:
            _run_workers(matrix, work_dir, jobs, [e.name for e in phase], results, rerun)
            ran += [e.name for e in phase if matrix.record_path(e).is_file()]
        else:
            for experiment in phase:
                print(f"[matrix] {experiment.name} ({', '.join(experiment.groups)})", flush=True)
                run_experiment(matrix, experiment, work_dir)
                ran.append(experiment.name)
    return ran


def _run_workers(
    matrix: Matrix, work_dir: Path, jobs: int, names: list[str], results: str | Path | None, rerun: bool = False,
    poll_s: float = 2.0,
) -> None:
    """Train ``names`` in up to ``jobs`` processes at once, one run per process
    (``python -m or_core matrix --only NAME``), each starting as soon as a core is free, so
    that no core idles while runs are left (runs take 400 to 700 s on the cpu scale). A
    failed run does not stop the others; the first failure is raised once all have ended."""
    threads = max(1, (os.cpu_count() or jobs) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "or_core", "matrix", str(matrix.path), "--work", str(work_dir)]
    if results is not None:
        cmd += ["--results", str(results)]
    if rerun:
        cmd += ["--rerun"]
    pending, running, failed = list(names), {}, []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            running[name] = subprocess.Popen([*cmd, "--only", name], env=env)
        finished = {name: code for name, worker in running.items() if (code := worker.poll()) is not None}
        for name, code in finished.items():
            del running[name]
            if code:
                failed.append(f"{name} (exit code {code})")
        if not finished:
            time.sleep(poll_s)
    if failed:
        raise RuntimeError(f"matrix runs failed: {', '.join(failed)}; rerun the same command to resume")
