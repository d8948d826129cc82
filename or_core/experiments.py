"""Experiment matrices: a YAML list of runs, each trained once and recorded in ``results/``.

A matrix file (``configs/matrix_cpu_paired.yaml``) names a profile, a results folder and
entries; an entry's list values expand to every combination::

    profile: cpu
    results: results/matrix_cpu_paired
    choose_gamma: {metric: val_knn_top1, selection_seeds: [100],
                   grids: {so: [1e-5, 1e-6, 1e-7], srip: [1e-3, 1e-4, 1e-5]}}
    runs:
      - {group: byol, method: byol, regularizer: none, seed: [0, 1, 2, 3, 4]}
      - {group: byol, method: byol, regularizer: [so, srip], gamma: chosen, seed: [0, 1, 2, 3, 4]}

``gamma: chosen`` takes the gamma of the paper's grid with the best mean validation metric
(``val_knn_top1``: held-out *training* images; a test metric is refused) over the
``selection_seeds``, chosen per (method, data set, regularizer): each ``gamma: chosen`` run
gets its own method's and data set's choice. The grid runs that choose it are generated, one
per gamma and selection seed (group ``selection``, plus the groups of the runs they choose
for); no run of ``runs:`` may use a selection seed, so every comparison is made on seeds the
choice never saw (no winner's curse). ``so_diag`` and ``so_offdiag``, the two parts of SO, use
SO's grid unless ``grids`` gives their own.

The first matrices (``configs/matrix_cpu.yaml``) use the single-method form, kept as it was:
``choose_gamma: {method: byol, dataset: cifar10, metric: ..., grids: ...}`` chooses one gamma
per regularizer for every method, from that method's seed-0 runs of the grid, which
``runs:`` must list (and which are also compared).

Entries with ``outside_paper_grid: true`` are shown, marked, and never chosen. ``transfer:
[names]`` adds linear probes of the final encoder on other data sets.

:func:`run_matrix` trains every run whose record is missing (a run interrupted half-way
resumes from its checkpoint in the work folder), then writes its record: config, summary,
per-epoch history, collapse spectra (:func:`or_core.measure.collapse_spectra`), transfer probes,
the gamma choice and provenance. Runs already recorded are skipped, so the one command both
starts and resumes the matrix::

    python -m or_core matrix configs/matrix_cpu.yaml --jobs 2

The whole file is checked before anything runs (every run's config, each bad entry named by
its number in ``runs:``), and a run that fails does not stop the others: the failures are
listed at the end (:class:`MatrixRunsFailed`) and the same command runs them again.

Reading a matrix file, choosing gamma from the records and listing the runs still to train
need no training code: they live in :mod:`or_core.matrix` (and are importable from here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from or_core.config import fit_to_data, resolve_config
from or_core.data import load_split, load_split_at_most
from or_core.errors import InputError, input_error_message
from or_core.evaluate import extract_features, knn_accuracy, linear_probe_accuracy
from or_core.matrix import (
    Experiment,
    GammaNotChosen,
    Matrix,
    check_selection,
    choice_key,
    choose_gamma,
    grid_of,
    load_matrix,
    pending_runs,
    resolve_chosen,
    resolve_each,
    run_name,
)
from or_core.measure import TrainedRun, collapse_spectra, load_trained
from or_core.provenance import provenance
from or_core.records import scale_of, write_record
from or_core.run_files import CHECKPOINT_FILE, read_metrics
from or_core.run_lock import RunInUseError, lock_holder, run_lock
from or_core.train import pretrain

# The names of or_core.matrix (parsing a matrix file, choosing gamma) are importable from here too:
# the notebooks and tests that train a matrix name them so.
__all__ = [
    "Experiment", "Matrix", "GammaNotChosen", "MatrixRunsFailed", "load_matrix", "run_name", "choose_gamma",
    "choice_key", "grid_of", "resolve_chosen", "pending_runs", "run_experiment", "run_matrix", "matrix_work_dir",
    "being_trained",
]

#: Lines of a worker's stderr kept to name its error once it has failed.
WORKER_TAIL_LINES = 40
#: How a failed run is reported on stderr, live and in the final list; a parent process reads
#: its workers' failures back from this line.
FAILED_LINE = "[matrix] failed: {name}: {message}"
SKIPPED_LINE = "[matrix] skipped: {name}: process {pid} on {host} is training it"


class MatrixRunsFailed(InputError):
    """Some runs of a matrix failed; the others ran and are recorded. ``failures`` maps each
    failed run's name to its one-line error."""

    def __init__(self, message: str, failures: dict[str, str]) -> None:
        super().__init__(message)
        self.failures = failures


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _transfer(run: TrainedRun, datasets: Sequence[str]) -> dict[str, dict[str, float]]:
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


def run_experiment(
    matrix: Matrix, experiment: Experiment, work_dir: str | Path, show_progress: bool = False
) -> dict[str, Any]:
    """Train (or resume) one run in ``work_dir/<name>``, then write and return its record.

    The run directory's lock (:func:`or_core.run_lock.run_lock`) is held from training to
    the record, so that no other process trains or records the same run meanwhile.

    Raises:
        RunInUseError: another live process holds the run directory.
    """
    if experiment.needs_chosen_gamma:
        raise ValueError(f"{experiment.name}: choose its gamma first (Experiment.with_gamma)")
    out = Path(work_dir) / experiment.name
    with run_lock(out):
        return _train_and_record(matrix, experiment, out, show_progress)


def _train_and_record(matrix: Matrix, experiment: Experiment, out: Path, show_progress: bool) -> dict[str, Any]:
    overrides = dict(experiment.overrides)
    cfg = fit_to_data(resolve_config(matrix.profile, overrides={**overrides, "profile": matrix.profile}))
    start = time.perf_counter()
    summary = pretrain(cfg, out, show_progress=show_progress)
    run = load_trained(out)
    test = load_split(cfg.dataset, "test", Path(os.path.expanduser(cfg.data_root)), cfg.image_size,
                      cfg.eval_test_subset, cfg.seed)
    history = read_metrics(out)
    record = {
        "name": experiment.name,
        "matrix": matrix.path.name,
        "groups": list(experiment.groups),
        "outside_paper_grid": experiment.outside_paper_grid,
        "selection_run": experiment.selection,
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
        if not (work_dir / experiment.name / CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(
                f"{experiment.name}: transfer probes {missing} need the run's checkpoint in {work_dir}"
            )
        run = load_trained(work_dir / experiment.name)
        record["transfer"] = {**(record.get("transfer") or {}), **_transfer(run, missing)}
    # The training's provenance stays; what this merge added has its own (code, date, command).
    merged = {"added": {"groups": experiment.groups, "transfer": missing}, **provenance()}
    record["provenance"]["merges"] = [*record["provenance"].get("merges", []), merged]
    write_record(path, record)


def _error_line(error: Exception, debug: bool = False) -> str:
    """The one-line error of a failed run: the command line's message of an input error; for a
    bug its type and message, its traceback printed now (the run's own output is next to it).
    With ``debug`` the traceback of an input error is printed too."""
    message = input_error_message(error)
    if message is None or debug:
        traceback.print_exception(error)
    if message is None:
        message = " ".join(f"{type(error).__name__}: {error}".split()) + " (a bug: see its traceback above)"
    return message


def _attempt(name: str, work: Callable[[], Any], failed: dict[str, str], debug: bool = False) -> bool:
    """Do ``work`` for run ``name``; if it fails, note its one-line error in ``failed`` (and
    print it at once) instead of raising, so that the matrix goes on with the other runs. A run
    that another process is training is skipped with a line on stderr, not failed: that
    process records it."""
    try:
        work()
    except RunInUseError as error:
        print(SKIPPED_LINE.format(name=name, pid=error.holder["pid"], host=error.holder["host"]),
              file=sys.stderr, flush=True)
        return False
    except Exception as error:  # one failed run must not stop the others; all are listed at the end
        _fail(failed, name, _error_line(error, debug))
        return False
    return True


def _fail(failed: dict[str, str], name: str, message: str) -> None:
    failed[name] = message
    print(FAILED_LINE.format(name=name, message=message), file=sys.stderr, flush=True)


def _not_chosen(matrix: Matrix, experiment: Experiment, error: GammaNotChosen, failed: dict[str, str]) -> str:
    """Why a chosen run is not run: its grid's runs that failed in this call, if any, else the
    records the choice lacks."""
    reg = experiment.overrides.get("regularizer")
    if matrix.per_method:
        key = choice_key(experiment.overrides)
        grid = {e.name for e in matrix.experiments if e.selection and choice_key(e.overrides) == key}
    else:
        grid = {e.name for e in matrix.experiments
                if not e.needs_chosen_gamma and e.overrides.get("regularizer") == reg}
    grid_failed = [name for name in failed if name in grid]
    if grid_failed:
        return f"not run: its gamma cannot be chosen, as {reg} grid run(s) {', '.join(grid_failed)} failed"
    return f"not run: {error}"


def _raise_failures(failed: dict[str, str], ran: Sequence[str], rerun: bool) -> None:
    """List each failed run with its error on stderr (each was also printed as it failed: a
    lone run's line is not repeated), then raise :class:`MatrixRunsFailed`."""
    if len(failed) + len(ran) > 1:
        for name, message in failed.items():
            print(FAILED_LINE.format(name=name, message=message), file=sys.stderr)
    again = (
        f"train them again with --rerun --only {' '.join(failed)}" if rerun
        else "re-run the same command to resume (recorded runs are skipped)"
    )
    others = "the others are recorded; " if ran else ""
    raise MatrixRunsFailed(
        f"{len(failed)} of {len(failed) + len(ran)} matrix runs failed ({', '.join(failed)}), each listed above with "
        f"its error; {others}fix the errors and {again}",
        dict(failed),
    )


def matrix_work_dir(path: str | Path, work_dir: str | Path | None = None) -> Path:
    """The folder of a matrix's run directories: ``work_dir``, else
    ``~/.cache/or_core/matrix/<matrix file's stem>``."""
    return Path(work_dir).expanduser() if work_dir else Path("~/.cache/or_core/matrix").expanduser() / Path(path).stem


def being_trained(path: str | Path, names: Sequence[str], work_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Which of the runs ``names`` of the matrix at ``path`` another live process is training
    now: ``{name: {"host", "pid"}}`` (:func:`or_core.run_lock.lock_holder` of each run directory)."""
    root = matrix_work_dir(path, work_dir)
    holders = {name: lock_holder(root / name) for name in names}
    return {name: holder for name, holder in holders.items() if holder is not None}


def run_matrix(
    path: str | Path,
    work_dir: str | Path | None = None,
    jobs: int = 1,
    groups: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
    results: str | Path | None = None,
    dry_run: bool = False,
    rerun: bool = False,
    debug: bool = False,
) -> list[str]:
    """Run every pending experiment of the matrix at ``path``; returns the names it ran (or
    would run, with ``dry_run``: :func:`or_core.matrix.pending_runs`).

    The whole file is validated first (:func:`load_matrix`: every run's config), so a bad entry
    stops the matrix before anything runs. Runs that need no chosen gamma go first; then the
    gamma is chosen from their records and the rest run (a chosen run the grid already made
    is not trained again: its record gains the group). ``jobs > 1`` trains that many runs at
    once, each in its own process (``python -m or_core matrix --only NAME``, ``cores / jobs``
    torch threads), the next starting when one ends; each phase waits for all of its runs.
    ``only`` restricts the matrix to runs with these names (chosen runs by their resolved
    names). ``debug`` prints the traceback of every failed run (and passes ``--debug`` to the
    workers). ``rerun`` trains the selected runs again and overwrites their records (give it a
    fresh ``work_dir``: a finished run directory is returned as it is).

    A failed run does not stop the others (a chosen run whose grid failed is not run); at the
    end each failure is listed on stderr with its one-line error and :class:`MatrixRunsFailed`
    is raised, naming them.
    """
    matrix = load_matrix(path, results)
    if dry_run:
        return pending_runs(matrix, groups, only, rerun)
    check_selection(matrix, groups, only)
    work_dir = matrix_work_dir(matrix.path, work_dir)
    wanted = [e for e in matrix.experiments if groups is None or set(e.groups) & set(groups)]
    ran: list[str] = []
    failed: dict[str, str] = {}
    for chosen_phase in (False, True):
        phase = [e for e in wanted if e.needs_chosen_gamma == chosen_phase]
        if chosen_phase and phase:
            phase, unresolved = resolve_each(matrix, phase)
            # A worker (--only) of the first phase skips them: the rest of the grid is still training.
            for e, error in unresolved if only is None else []:
                _fail(failed, e.name, _not_chosen(matrix, e, error, failed))
            for e in phase:
                if matrix.record_path(e).is_file() and not rerun:
                    _attempt(e.name, lambda e=e: _merge_groups(matrix, e, work_dir), failed, debug)
        phase = [e for e in phase
                 if (rerun or not matrix.record_path(e).is_file()) and (only is None or e.name in only)]
        phase = list({e.name: e for e in phase}.values())
        if not phase:
            continue
        if jobs > 1 and len(phase) > 1:
            failures = _run_workers(matrix, work_dir, jobs, [e.name for e in phase], results, rerun, debug=debug)
            failed.update(failures)
            ran += [e.name for e in phase if matrix.record_path(e).is_file() and e.name not in failures]
        else:
            for experiment in phase:
                if not rerun and matrix.record_path(experiment).is_file():
                    continue  # recorded meanwhile by another process working on the same matrix
                print(f"[matrix] {experiment.name} ({', '.join(experiment.groups)})", flush=True)
                if _attempt(experiment.name, lambda e=experiment: run_experiment(matrix, e, work_dir), failed, debug):
                    ran.append(experiment.name)
    if failed:
        _raise_failures(failed, ran, rerun)
    return ran


class _Worker:
    """A process training one run of the matrix. Its stderr is relayed to ours as it comes,
    each line prefixed with the run's name (workers write side by side), and its last lines
    are kept to name its error once it has ended."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        self.tail: deque[str] = deque(maxlen=WORKER_TAIL_LINES)
        self._relay = threading.Thread(target=self._read, args=(self.process.stderr,), daemon=True)
        self._relay.start()

    def _read(self, stream: Iterable[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
            self.tail.append(line)

    def error(self, code: int) -> str | None:
        """``None`` for exit code 0, else the worker's one-line error: its own line for the
        failed run, else its last ``error:`` line, else the exit code and its last line."""
        self._relay.join(timeout=10)  # the rest of its stderr, now that it has ended
        if not code:
            return None
        marker = FAILED_LINE.format(name=self.name, message="")
        lines = list(self.tail)
        for line in reversed(lines):
            if line.startswith(marker):
                return line[len(marker):]
        for line in reversed(lines):
            if line.startswith("error: "):
                return line[len("error: "):]
        last = next((line for line in reversed(lines) if line.strip()), "nothing")
        return f"its worker exited with code {code}; its last line on stderr: {last.strip()}"


def _run_workers(
    matrix: Matrix, work_dir: Path, jobs: int, names: list[str], results: str | Path | None, rerun: bool = False,
    poll_s: float = 2.0, debug: bool = False,
) -> dict[str, str]:
    """Train ``names`` in up to ``jobs`` processes at once, one run per process
    (``python -m or_core matrix --only NAME``), each starting as soon as a core is free, so
    that no core idles while runs are left (runs of the cpu scale take several minutes each). A
    failed run does not stop the others; returns each failed run's one-line error, read from
    its worker's stderr (which is shown as it comes)."""
    threads = max(1, (os.cpu_count() or jobs) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "or_core", "matrix", str(matrix.path), "--work", str(work_dir)]
    if results is not None:
        cmd += ["--results", str(results)]
    if rerun:
        cmd += ["--rerun"]
    if debug:
        cmd += ["--debug"]
    pending, running, failed = list(names), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            running[name] = _Worker(name, [*cmd, "--only", name], env)
        finished = {name: code for name, worker in running.items() if (code := worker.process.poll()) is not None}
        for name, code in finished.items():
            error = running.pop(name).error(code)
            if error is not None:
                failed[name] = error
        if not finished:
            time.sleep(poll_s)
    return {name: failed[name] for name in names if name in failed}  # in the matrix's order, not the finishing one
