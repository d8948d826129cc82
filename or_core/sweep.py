"""Train a few configurations side by side, or reuse their run folders, and collect what each left.

The notebooks compare a handful of runs that differ in one setting (BYOL without OR, with SO,
with SRIP). :func:`run_sweep` trains each configuration into its own folder of ``runs_dir`` with
:func:`or_core.train.pretrain`, which resumes a stopped run and returns a finished one as it is,
so the same call starts, resumes or merely reads a comparison. It collects each run's summary
and per-epoch history (``metrics.jsonl``), optionally the untrained encoder as a reference, and
optionally the trained encoders themselves, rebuilt from their checkpoints::

    from or_core.sweep import run_sweep

    sweep = run_sweep({"BYOL": cfg_none, "BYOL + SO": cfg_so}, "../runs", untrained=True)
    sweep.summaries["BYOL + SO"]["knn_top1"], sweep.histories["BYOL"][-1]["ssl_loss"]

With ``runs_dir=None`` the runs go to a temporary folder that is deleted before the call returns.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from or_core.checkpoint import load_checkpoint
from or_core.config import PretrainConfig
from or_core.evaluate import evaluate_run
from or_core.run_files import CHECKPOINT_FILE, read_metrics
from or_core.train import pretrain
from or_core.training_run import Run, build_run

__all__ = ["UNTRAINED", "SweepRun", "Sweep", "run_folder_name", "run_sweep"]

#: The name of the untrained reference in a :class:`Sweep`.
UNTRAINED = "untrained"


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    ``folder`` is ``None`` for the untrained reference and for runs trained in a temporary
    folder (already deleted). ``history`` has one dict per epoch (empty for the untrained
    reference). ``seconds`` is what this call spent on the run: training and evaluation, or
    only reading a finished run back, plus rebuilding its encoder. ``run`` holds the encoder
    (``run.method.backbone``) when the sweep was asked to keep it.
    """

    config: PretrainConfig
    folder: Path | None
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    run: Run | None = None


@dataclass(frozen=True)
class Sweep:
    """The runs of :func:`run_sweep` by name, in order: the untrained reference first, if any."""

    runs: dict[str, SweepRun]

    @property
    def summaries(self) -> dict[str, dict[str, Any]]:
        """Every run's summary (kNN and linear accuracy, collapse scalars, timing, versions)."""
        return {name: r.summary for name, r in self.runs.items()}

    @property
    def histories(self) -> dict[str, list[dict[str, Any]]]:
        """The per-epoch histories of the trained runs (the untrained reference has none)."""
        return {name: r.history for name, r in self.runs.items() if name != UNTRAINED}

    @property
    def encoders(self) -> dict[str, Run]:
        """The runs with their final weights, for a sweep made with ``keep_runs=True``."""
        return {name: r.run for name, r in self.runs.items() if r.run is not None}


def run_folder_name(cfg: PretrainConfig) -> str:
    """``<dataset>-<method>[-<regularizer>]``: the folder names of the commands in book/reproduce.md
    (``cifar10-byol``, ``cifar10-byol-so``); a dataset given as a path contributes its last part."""
    name = f"{Path(cfg.dataset).name}-{cfg.method}"
    return name if cfg.regularizer == "none" else f"{name}-{cfg.regularizer}"


def _with_weights(cfg: PretrainConfig, folder: Path) -> Run:
    """The run of ``cfg`` rebuilt (data, model) with the weights of its checkpoint in ``folder``."""
    run = build_run(cfg)
    run.method.load_state_dict(load_checkpoint(folder / CHECKPOINT_FILE)["method"])
    return run


def run_sweep(
    configs: Mapping[str, PretrainConfig],
    runs_dir: str | Path | None = None,
    *,
    untrained: bool = False,
    keep_runs: bool = False,
    log: Callable[[str], None] | None = print,
) -> Sweep:
    """Train (or resume, or read back) every configuration of ``configs`` and collect the runs.

    Args:
        configs: the runs by display name, trained in this order.
        runs_dir: the folder of the run folders, one per configuration, named by
            :func:`run_folder_name`; a folder that holds a finished run of the same configuration
            is read back, one that holds a stopped run resumes from its checkpoint. ``None``:
            a temporary folder, deleted before this returns.
        untrained: also evaluate the untrained encoder of the first configuration (its
            initialization, which every configuration with the same seed, backbone and width
            shares) as :data:`UNTRAINED`, placed first.
        keep_runs: keep every encoder with its final weights in :attr:`SweepRun.run`. Each holds
            its own copy of the training data, as :func:`or_core.train.build_run` loads it.
        log: called with one line per run (time, training time, throughput, device); ``None``:
            silent.

    Raises:
        ValueError: no configurations, or two of them would share a run folder.
        or_core.train.RunConfigMismatchError: a run folder holds a checkpoint of another
            configuration.
    """
    if not configs:
        raise ValueError("run_sweep needs at least one configuration")
    if untrained and UNTRAINED in configs:
        raise ValueError(f"{UNTRAINED!r} names the untrained reference: give that configuration another name")
    folders = {name: run_folder_name(cfg) for name, cfg in configs.items()}
    shared = sorted({f for f in folders.values() if list(folders.values()).count(f) > 1})
    if shared:
        clashes = "; ".join(f"{f}: {', '.join(n for n in folders if folders[n] == f)}" for f in shared)
        raise ValueError(f"configurations that would share a run folder ({clashes}): they must differ "
                         "in dataset, method or regularizer")
    runs: dict[str, SweepRun] = {}
    if untrained:
        first = next(iter(configs.values()))
        start = time.perf_counter()
        initial = build_run(first)
        summary = evaluate_run(initial, history=[], wall=0.0)
        runs[UNTRAINED] = SweepRun(first, None, summary, [], time.perf_counter() - start,
                                   initial if keep_runs else None)
    temporary = tempfile.TemporaryDirectory(prefix="or_core_sweep-") if runs_dir is None else None
    root = Path(temporary.name if temporary else runs_dir)
    try:
        for name, cfg in configs.items():
            start = time.perf_counter()
            folder = root / folders[name]
            summary = pretrain(cfg, folder, show_progress=False)
            history = read_metrics(folder)
            run = _with_weights(cfg, folder) if keep_runs else None
            seconds = time.perf_counter() - start
            runs[name] = SweepRun(cfg, None if temporary else folder, summary, history, seconds, run)
            if log is not None:
                log(f"{name}: {seconds:.0f} s in all, training {summary['wall_time_s']:.0f} s at "
                    f"{summary['images_per_s']:,.0f} images/s ({summary['device']})")
    finally:
        if temporary is not None:
            temporary.cleanup()
    return Sweep(runs)
