"""The pretraining loop: views -> method loss + OR term -> optimizer, with exact resume.

One step::

    uint8 batch (resident on the device) -> batched augmentation -> views
    -> method.training_loss (EMA update, SSL loss, OR term on the online backbone)
    -> backward -> optimizer -> learning-rate schedule

Every epoch appends a line to ``metrics.jsonl`` and writes ``checkpoint.pt`` atomically
(:mod:`or_core.run_files`); the end of training evaluates the final weights (kNN and linear
probe, :func:`or_core.evaluate.evaluate_run`) into ``summary.json``. The run itself (data,
method, optimizer, schedule) is built by :func:`or_core.training_run.build_run`, its optimizer
by :mod:`or_core.optim`. What the loop does only to run faster (batched augmentation calls,
compiled encoders, deferred NaN checks) is in :mod:`or_core.fast_path`, one call each.
Calling :func:`pretrain` again with the same run directory resumes from the last checkpoint
(model, optimizer, schedule, EMA targets, memory banks, RNG states, position); on the CPU the
resumed run ends with weights bit-identical to an uninterrupted one.

Launched by ``torchrun`` with several processes, the same loop trains with
``DistributedDataParallel`` (see :mod:`or_core.distributed`): ``batch_size`` is the global
batch, each process loads, augments and trains on its shard of it, and rank 0 alone writes the
run directory and evaluates.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import record_function

from or_core import distributed
from or_core.checkpoint import load_checkpoint, save_atomic
from or_core.config import PretrainConfig, fit_to_data
from or_core.data import load_split_at_most
from or_core.diagnostics import effective_rank, std_of_l2_normalized
from or_core.divergence import NonFiniteLossError, check_finite_losses, check_finite_weights, require_finite
from or_core.evaluate import evaluate_dir, evaluate_run, extract_features  # evaluate_dir: for the command line
from or_core.fast_path.batched_views import step_views
from or_core.run_lock import run_lock
from or_core.fast_path.compiled_calls import mark_step_begin
from or_core.fast_path.deferred_checks import DeferredLossCheck
from or_core.optim import clip_gradients, schedule_weight_decay
from or_core.progress import progress_bar
from or_core.run_files import (
    CHECKPOINT_FILE,
    RunConfigMismatchError,
    prepare_run_dir,
    read_summary,
    remove_partial_writes,
    write_metrics,
    write_summary,
)
from or_core.training_run import Run, build_run, select_device, trains_in_cpu_bf16

if TYPE_CHECKING:
    from tqdm import tqdm

# build_run, evaluate_run and evaluate_dir live in or_core.training_run and or_core.evaluate; they
# stay importable from here for the notebooks and the command line that name them so.
__all__ = [
    "NonFiniteLossError",
    "RunConfigMismatchError",
    "Run",
    "build_run",
    "optimization_step",
    "training_step",
    "train_epoch",
    "evaluate_dir",
    "evaluate_run",
    "pretrain",
]


def _state(run: Run, epoch: int, step: int, history: list, augment_rng: torch.Generator, wall: float) -> dict:
    return {
        "epoch": epoch,
        "global_step": step,
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "augment_rng": augment_rng.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history,
        "train_wall_time_s": wall,
        "config": run.cfg.to_dict(),
    }


def _restore(run: Run, state: dict, augment_rng: torch.Generator) -> None:
    run.method.load_state_dict(state["method"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    augment_rng.set_state(state["augment_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


@torch.no_grad()
def _probe_batch_stats(run: Run, probe: torch.Tensor, when: str = "") -> dict[str, float]:
    feats = extract_features(run.method.backbone, probe, run.mean, run.std, device=run.device, amp=run.cfg.amp)
    require_finite(feats, f"the features of the probe batch {when}".rstrip())
    return {"effective_rank": effective_rank(feats), "std_of_l2_normalized": std_of_l2_normalized(feats).item()}


def training_step(
    run: Run, images: torch.Tensor, progress: float, augment_rng: torch.Generator, indices: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """One optimization step on a uint8 batch: augment (:func:`step_views`), then
    :func:`optimization_step` (``indices``: the images' positions in the training set)."""
    return optimization_step(run, next(step_views(run, [images], augment_rng)), progress, indices)


def _amp(run: Run) -> bool:
    """Whether the run's forward passes run under bfloat16 autocast (CUDA amp, or the CPU's)."""
    return (run.cfg.amp and run.device.type == "cuda") or trains_in_cpu_bf16(run.cfg, run.device)


def _for_autocast(run: Run, views: list[torch.Tensor], amp: bool) -> list[torch.Tensor]:
    if amp and (run.cfg.channels_last or run.device.type == "cpu"):
        return [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def optimization_step(
    run: Run, views: list[torch.Tensor], progress: float, indices: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """One optimization step on a batch's augmented views: loss (+ OR term), backward, update.

    Returns the method's loss terms, detached; nothing here waits for the device.
    """
    method = run.method
    amp = _amp(run)
    mark_step_begin(run.compiled)  # compiled encoders: a new iteration of their CUDA graphs
    # (the labels name the phases in a torch.profiler trace: benchmarks/step_profile.py)
    with record_function("forward"):
        views = _for_autocast(run, views, amp)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=amp):
            out = run.module(views, progress, indices)  # method.training_loss, through DDP when wrapped
    with record_function("backward"):
        run.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
    with record_function("optimizer"):
        clip_gradients(run.optimizer)  # the recipe's clip_grad, before DINO drops its last layer's gradients
        method.on_after_backward(progress)
        schedule_weight_decay(run.optimizer, progress)  # the recipe's weight_decay_end
        run.optimizer.step()
        run.scheduler.step()
        method.on_train_step_end(progress)
    return {k: v.detach().float() for k, v in out.items()}


def epoch_views(
    run: Run, epoch: int, augment_rng: torch.Generator
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """The augmented views of every batch of ``epoch`` with the positions of its images in the
    training set (:meth:`Run.epoch_batches`, :func:`step_views`)."""
    # several batches per augmentation call: their positions wait in a queue until their views come
    positions: deque[torch.Tensor] = deque()

    def images_of_the_epoch() -> Iterator[torch.Tensor]:
        for images, indices in run.epoch_batches(epoch):
            positions.append(indices)
            yield images

    for views in step_views(run, images_of_the_epoch(), augment_rng):
        yield views, positions.popleft()


def initial_pass(run: Run, augment_rng: torch.Generator) -> float:
    """The pass over the training set that a method which ``needs_initial_pass`` makes before its
    first step: every batch's views (in epoch 0's order) and positions go to
    ``method.initial_pass_step`` without gradients, then ``method.end_initial_pass()`` runs
    (DeepCluster V2 fills its memory and clusters it). Returns its seconds."""
    start = time.perf_counter()
    method, amp = run.method, _amp(run)
    method.train()
    with torch.no_grad():
        for views, indices in epoch_views(run, 0, augment_rng):
            mark_step_begin(run.compiled)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=amp):
                method.initial_pass_step(_for_autocast(run, views, amp), indices)
    method.end_initial_pass()
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _what_is_kept(out: Path, epoch: int, main: bool) -> str:
    """What a stopped run leaves: the last good checkpoint, if one exists."""
    if main and epoch > 0 and (out / CHECKPOINT_FILE).is_file():
        return f"nothing of epoch {epoch + 1} was saved: the last good checkpoint (epoch {epoch}) is kept"
    return "nothing was saved (no checkpoint yet)"


def train_epoch(run: Run, epoch: int, step: int, augment_rng: torch.Generator, bar: tqdm | None) -> tuple[dict, int]:
    """One epoch of training; returns the epoch's mean losses and the new global step.

    Every step's loss is checked for NaN/inf (on a GPU in groups of steps,
    :class:`or_core.fast_path.deferred_checks.DeferredLossCheck`); the error names the first bad
    step, and the epoch's checkpoint is written only after its last check has passed.
    """
    cfg = run.cfg
    total_steps = cfg.epochs * run.steps_per_epoch
    run.method.train()
    sums = {"ssl_loss": torch.zeros((), device=run.device), "or_term": torch.zeros((), device=run.device)}
    losses = DeferredLossCheck(run.device, step, lambda pending, first: check_finite_losses(pending, first, epoch))
    for views, indices in epoch_views(run, epoch, augment_rng):  # augmented in batched calls
        out = optimization_step(run, views, step / total_steps, indices)
        losses.add(out["loss"])
        sums["ssl_loss"] += out["ssl_loss"]
        sums["or_term"] += out["or_term"]
        step += 1
        if bar is not None:
            bar.update(1)
    losses.flush()
    run.method.on_train_epoch_end(epoch)
    means = {k: distributed.all_reduce_mean(v).item() / run.steps_per_epoch for k, v in sums.items()}
    return means, step


def pretrain(
    cfg: PretrainConfig, out: str | Path, show_progress: bool = True, stop_after_epochs: int | None = None
) -> dict[str, Any]:
    """Pretrain (or resume) the run of ``cfg`` in ``out``; returns the summary.

    Args:
        cfg: the run's configuration.
        out: run directory: ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``,
            ``summary.json``. If it holds a checkpoint of the same configuration, training
            resumes from it; a finished run is returned as is.
        show_progress: show a tqdm progress bar.
        stop_after_epochs: return after this many epochs of this call (the run stays
            resumable; no summary is written unless training is complete).

    Under ``torchrun`` with several processes this initializes (and at the end destroys) the
    process group; every process trains and loads the checkpoint to resume, rank 0 alone writes
    the run directory, shows the progress bar and evaluates. The other ranks return
    ``{"epoch": ..., "finished": True, "rank": ...}`` once training is done.
    """
    owns_process_group = distributed.init_process_group(select_device(cfg.device))
    try:
        cfg = fit_to_data(cfg, notify=distributed.is_main_process())
        if not distributed.is_main_process():
            return _pretrain(cfg, Path(out), show_progress, stop_after_epochs)
        with run_lock(out):  # no second process trains the same directory meanwhile
            return _pretrain(cfg, Path(out), show_progress, stop_after_epochs)
    finally:
        if owns_process_group:
            distributed.destroy_process_group()


def _pretrain(
    cfg: PretrainConfig, out: Path, show_progress: bool, stop_after_epochs: int | None
) -> dict[str, Any]:
    main = distributed.is_main_process()
    if main and out.is_dir():
        remove_partial_writes(out)
    state = load_checkpoint(out / CHECKPOINT_FILE)
    prepare_run_dir(cfg, out, state, write=main)
    run = build_run(cfg)
    augment_rng = torch.Generator().manual_seed(cfg.seed + 1)
    epoch, step, history, wall = 0, 0, [], 0.0
    if state is not None:
        _restore(run, state, augment_rng)
        epoch, step, history, wall = state["epoch"], state["global_step"], state["history"], state["train_wall_time_s"]
        if main:
            write_metrics(out, history)
        if epoch >= cfg.epochs:
            summary = read_summary(out)
            if summary is not None:
                return summary
        if main:
            where = (f"epoch {epoch} of {cfg.epochs} (step {step})" if epoch < cfg.epochs
                     else "its final checkpoint (evaluation)")
            print(f"resuming {out} from {where}", file=sys.stderr, flush=True)
    # the fixed test batch whose statistics metrics.jsonl records every epoch
    probe = load_split_at_most(
        cfg.dataset, "test", Path(os.path.expanduser(cfg.data_root)), cfg.image_size, 512, cfg.seed
    ).images
    bar = progress_bar(total=cfg.epochs * run.steps_per_epoch, initial=step, enabled=show_progress and main,
                       desc=f"{cfg.method}+{cfg.regularizer}")
    epochs_this_call = 0
    if state is None and run.method.needs_initial_pass:  # (resumed, it is in the checkpoint)
        wall += initial_pass(run, augment_rng)
    try:
        while epoch < cfg.epochs:
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                return {"epoch": epoch, "finished": False}
            start = time.perf_counter()
            try:
                means, step = train_epoch(run, epoch, step, augment_rng, bar)
                when = f"after epoch {epoch + 1} (step {step})"
                check_finite_weights(run.method, when)
                probe_stats = _probe_batch_stats(run, probe, when)
            except NonFiniteLossError as error:
                raise NonFiniteLossError(f"{error}; {_what_is_kept(out, epoch, main)}") from None
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            wall += seconds
            epoch += 1
            epochs_this_call += 1
            line = {
                "epoch": epoch,
                "step": step,
                **means,
                "lr": run.optimizer.param_groups[0]["lr"],
                "images_per_s": run.steps_per_epoch * cfg.batch_size / seconds,
                "epoch_time_s": seconds,
                **probe_stats,
            }
            history.append(line)
            if main:
                save_atomic(_state(run, epoch, step, history, augment_rng, wall), out / CHECKPOINT_FILE)
                write_metrics(out, history)
            if bar is not None:
                bar.set_postfix(loss=f"{means['ssl_loss']:.3f}", or_term=f"{means['or_term']:.2e}")
    finally:
        bar.close()
    if not main:
        return {"epoch": epoch, "finished": True, "rank": distributed.rank()}
    check_finite_weights(run.method, "before the evaluation")
    summary = evaluate_run(run, history, wall)
    write_summary(out, summary)
    return summary
