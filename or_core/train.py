"""The pretraining loop: views -> method loss + OR term -> optimizer, with exact resume.

One step::

    uint8 batch (resident on the device) -> batched augmentation -> views
    -> method.training_loss (EMA update, SSL loss, OR term on the online backbone)
    -> backward -> optimizer -> learning-rate schedule

Every epoch appends a line to ``metrics.jsonl`` and writes ``checkpoint.pt`` atomically; the
end of training evaluates the final weights (kNN and linear probe) into ``summary.json``.
Calling :func:`pretrain` again with the same run directory resumes from the last checkpoint
(model, optimizer, schedule, EMA targets, memory banks, RNG states, position); on the CPU the
resumed run ends with weights bit-identical to an uninterrupted one.

Launched by ``torchrun`` with several processes, the same loop trains with
``DistributedDataParallel`` (see :mod:`or_core.distributed`): ``batch_size`` is the global
batch, each process loads, augments and trains on its shard of it, and rank 0 alone writes the
run directory and evaluates.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightly
import torch
import yaml
from lightly.utils.scheduler import CosineWarmupScheduler
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from or_core import distributed
from or_core.augment import MultiViewAugment
from or_core.backbones import build_backbone
from or_core.checkpoint import load_checkpoint, save_atomic, write_text_atomic
from or_core.compiling import compile_encoders, compile_mode
from or_core.config import PretrainConfig, fit_to_data
from or_core.data import ImageTensors, batches, load_holdout, load_split, load_split_at_most, resolve_dataset, streaming_loader
from or_core.errors import ConfigError, DataError, InputError, MissingPathError
from or_core.diagnostics import effective_rank, rankme, std_of_l2_normalized
from or_core.evaluate import extract_features, knn_accuracy, linear_probe_accuracy
from or_core.lars import LARS
from or_core.methods import SSLMethod, build_method, method_class
from or_core.methods.base import clip_gradients, schedule_weight_decay
from or_core.orthogonality import regularized_weights, so_penalty
from or_core.records import git_commit

__all__ = ["NonFiniteLossError", "RunConfigMismatchError", "Run", "build_run", "step_views", "optimization_step", "training_step", "evaluate_dir", "evaluate_run", "pretrain", "read_metrics"]

#: The config fields that ``evaluate`` may change: they decide how, not what, was trained.
EVALUATION_FIELDS = ("eval_train_subset", "eval_test_subset", "val_images", "linear_epochs", "knn_k", "knn_t")

CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoint.pt",
    "summary.json",
)


class NonFiniteLossError(InputError, FloatingPointError):
    """The loss or the weights became NaN or infinite (a learning rate too high, most often);
    nothing of the diverged step is saved, the last good checkpoint (if any) is left untouched."""


class RunConfigMismatchError(InputError, ValueError):
    """``--out`` already holds a checkpoint made with a different configuration."""


def select_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Run:
    """The pieces of one run, built from its config (see :func:`build_run`).

    ``module`` runs the forward: the ``DistributedDataParallel`` wrapper of ``method`` in a
    multi-process run, ``method`` itself otherwise. ``method`` is always the unwrapped method
    (hooks, ``state_dict``, evaluation). ``compiled`` is the ``torch.compile`` mode applied to
    its encoders, if any (:mod:`or_core.compiling`).
    """

    cfg: PretrainConfig
    device: torch.device
    method: SSLMethod
    augment: MultiViewAugment
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: ImageTensors | None
    steps_per_epoch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    module: nn.Module | None = None
    loader: DataLoader | None = None
    train_size: int = 0
    image_size: int = 0
    compiled: str | None = None

    def __post_init__(self) -> None:
        if self.module is None:
            self.module = self.method
        if self.train is not None:
            self.train_size = self.train_size or len(self.train)
            self.image_size = self.image_size or int(self.train.images.shape[-1])

    def epoch_batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """The uint8 training batches of ``epoch``, on the device, in an order that is a
        function of the seed and the epoch alone (so a resumed run sees the same batches).

        In a multi-process run each is this process's shard of a global batch, its rows
        :func:`or_core.distributed.shard_rows` (the loader of a streamed run decodes only those);
        in one process the whole batch."""
        order = _epoch_order(self.cfg, epoch)
        if self.loader is None:
            rows = distributed.shard_rows(self.cfg.batch_size)
            for images, _ in batches(self.train, self.cfg.batch_size, shuffle=True, generator=order, rows=rows):
                yield images
            return
        self.loader.batch_sampler.generator = order  # SeededBatchSampler draws the permutation from it
        for images, _ in self.loader:
            yield images.to(self.device, non_blocking=True)


def _training_data(cfg: PretrainConfig, root: Path) -> tuple[ImageTensors | None, DataLoader | None, int, int]:
    """``(resident tensors, None, size, side)`` or, with ``cfg.stream``, ``(None, loader, ...)``."""
    if not cfg.stream:
        train = load_split(cfg.dataset, "train", root, cfg.image_size, cfg.subset, cfg.seed)
        return train, None, len(train), cfg.image_size or int(train.images.shape[-1])
    if cfg.image_size is None:
        raise ConfigError("stream: true needs image_size (the side of the training views): set image_size")
    if cfg.subset is not None:
        raise ConfigError("stream: true reads the whole training folder: drop subset, or set stream: false")
    source = resolve_dataset(cfg.dataset, root)
    loader = streaming_loader(  # each process decodes only its rows of every global batch
        source.root, cfg.decode_size or cfg.image_size, cfg.batch_size, cfg.num_workers,
        shuffle=True, seed=cfg.seed, split="train", drop_last=True, rows=distributed.shard_rows(cfg.batch_size),
    )
    return None, loader, len(loader.dataset), cfg.image_size


def build_optimizer(method: SSLMethod, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """The method's published optimizer (LARS, SGD or AdamW), with the config's overrides.

    The recipe is the method's for the run's backbone and image size
    (:meth:`~or_core.methods.base.SSLMethod.optimizer_defaults`: CIFAR, ImageNet-100,
    ImageNet-1k or ViT). The learning rate follows the linear scaling rule,
    ``lr * batch_size / recipe.batch_size``, unless ``cfg.lr`` is given. With the recipe's
    ``exclude_bias_and_norm`` biases and normalization parameters get no weight decay (and no
    LARS adaptation). LARS takes the recipe's trust coefficient and ``clip_lr``. A recipe's
    weight-decay schedule (``weight_decay_end``; only when ``cfg.weight_decay`` is not given,
    which makes the weight decay constant) and gradient clipping (``clip_grad``) are written
    into the parameter groups, saved with the optimizer's state, and applied each step by
    :func:`optimization_step`.
    """
    defaults = method.optimizer_defaults(cfg.backbone, cfg.image_size)
    name = cfg.optimizer or defaults.name
    lr = cfg.lr if cfg.lr is not None else defaults.scaled_lr(cfg.batch_size)
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else defaults.weight_decay
    groups = method.parameter_groups(weight_decay, exclude_bias_and_norm=defaults.exclude_bias_and_norm)
    for group in groups:
        if cfg.weight_decay is None and defaults.weight_decay_end is not None and group["weight_decay"] != 0:
            group.update(weight_decay_start=weight_decay, weight_decay_end=defaults.weight_decay_end)
        if defaults.clip_grad is not None:
            group["clip_grad"] = defaults.clip_grad
    if name == "lars":
        return LARS(
            groups, lr=lr, momentum=defaults.momentum, trust_coefficient=defaults.trust_coefficient,
            clip_lr=defaults.clip_lr, exclude_bias_n_norm=defaults.exclude_bias_and_norm,
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=defaults.momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; valid optimizers: lars, sgd, adamw")


def _check_method_kwargs(cfg: PretrainConfig) -> None:
    """``method_kwargs`` must be arguments of the method's constructor (named in the error)."""
    parameters = inspect.signature(method_class(cfg.method).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    valid = sorted(set(parameters) - {"self", "backbone", "feature_dim", "regularizer", "gamma"})
    unknown = sorted(set(cfg.method_kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"method_kwargs: {cfg.method} takes no {unknown}; valid: {', '.join(valid)}")


def build_run(cfg: PretrainConfig) -> Run:
    """Data, backbone, method (with its OR switch), augmentation, optimizer and schedule.

    In a multi-process run (an initialized process group) the device is ``cuda:LOCAL_RANK``
    on CUDA, methods that take ``gather_distributed`` get it, and the method is wrapped in
    ``DistributedDataParallel`` with synchronized batch norm (:mod:`or_core.distributed`).
    """
    device = distributed.local_device(select_device(cfg.device))
    distributed.check_batch_size(cfg.batch_size)
    if cfg.augment_batches < 1:
        raise ConfigError(f"augment_batches is a number of batches, at least 1; got {cfg.augment_batches}")
    _check_method_kwargs(cfg)
    mode = compile_mode(cfg.compile)  # validated before any data is loaded
    if mode is not None and distributed.world_size() > 1:
        warnings.warn(
            f"compile={cfg.compile!r} is not applied in a multi-process run: torch.compile and CUDA "
            "graphs are untested here with DDP and SyncBatchNorm's collectives; training runs eagerly",
            stacklevel=2,
        )
        mode = None
    data_root = Path(os.path.expanduser(cfg.data_root))
    train, loader, train_size, image_size = _training_data(cfg, data_root)
    if train_size < cfg.batch_size:
        raise DataError(
            f"the training set has {train_size} images, fewer than one batch of {cfg.batch_size}: "
            f"lower batch_size (--batch-size)"
        )
    # Seeded after loading: decoding a split the first time draws from the global RNG
    # (DataLoader workers), which must not change the initial weights.
    torch.manual_seed(cfg.seed)
    backbone, feature_dim = build_backbone(cfg.backbone, image_size=image_size, width=cfg.width)
    method_kwargs = distributed.method_kwargs(cfg.method, cfg.method_kwargs)
    method = build_method(
        cfg.method, backbone, feature_dim, regularizer=cfg.regularizer, gamma=cfg.gamma, **method_kwargs
    ).to(device)
    # CUDA only: on the CPU (torch 2.14, oneDNN) channels-last trained 15-30% faster but its
    # gradients were 1.5-3% off a float64 reference (NCHW: 3e-6 to 4e-3); measured 2026-11-25.
    if device.type == "cuda" and cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    if device.type == "cuda":  # fixed shapes: let cuDNN pick its fastest convolution once per shape
        torch.backends.cudnn.benchmark = True
    module = distributed.wrap_method(method, device)
    views = method.views(image_size, n_local_views=method.num_local_views)
    if cfg.augment_overrides:  # e.g. {"min_scale": 0.2}, on the global (full-size) views only
        unknown = sorted(set(cfg.augment_overrides) - {f.name for f in dataclasses.fields(views[0])})
        if unknown:
            valid = sorted(f.name for f in dataclasses.fields(views[0]) if f.name != "size")
            raise ConfigError(f"augment_overrides: unknown view field(s) {unknown}; valid: {', '.join(valid)}")
        views = [dataclasses.replace(v, **cfg.augment_overrides) if v.size == image_size else v for v in views]
    augment = MultiViewAugment(views)
    optimizer = build_optimizer(method, cfg)
    steps_per_epoch = train_size // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    recipe = method.optimizer_defaults(cfg.backbone, cfg.image_size)  # as build_optimizer's
    warmup_epochs = cfg.warmup_epochs if cfg.warmup_epochs is not None else recipe.warmup_epochs
    warmup_steps = min(warmup_epochs, cfg.epochs // 2) * steps_per_epoch
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=warmup_steps, max_epochs=total_steps)
    if mode is not None:
        compile_encoders(method, mode)
    return Run(
        cfg, device, method, augment, optimizer, scheduler, train.to(device) if train is not None else None,
        steps_per_epoch, tuple(views[0].mean), tuple(views[0].std), module, loader, train_size, image_size,
        compiled=mode,
    )


# ----------------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------------
def _prepare_run_dir(cfg: PretrainConfig, out: Path, state: dict[str, Any] | None, write: bool = True) -> None:
    """Check that the checkpoint in ``out`` (if any) was made with ``cfg``, then write
    ``config.yaml`` (atomically; ranks other than 0 pass ``write=False``).

    The checkpoint's own config is the reference, not ``config.yaml``: a directory whose
    ``config.yaml`` is missing cannot mix two configurations, and a first attempt that failed
    before its first epoch (no checkpoint) does not block the corrected command.
    """
    if state is not None:
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise RunConfigMismatchError(
                f"{out / CHECKPOINT_FILE} holds no config (written by an older version?): "
                f"use another --out, or delete {out} to start over"
            )
        current = cfg.to_dict()
        differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differing:
            shown = "; ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differing[:4])
            raise RunConfigMismatchError(
                f"{out} holds a checkpoint of a different configuration ({shown}): use another "
                f"--out, or delete {out} to start over"
            )
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _remove_partial_writes(out: Path) -> None:
    """Delete the temporary files (``.<name>.*tmp``) a killed write left in the run directory."""
    for tmp in out.glob(".*tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the history held in the checkpoint (atomic)."""
    write_text_atomic(out / METRICS_FILE, "".join(json.dumps(line) + "\n" for line in history))


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The per-epoch history in ``out/metrics.jsonl``, one dict per epoch; a line that is not
    JSON is a ``ValueError`` naming the file and the line."""
    path = Path(out) / METRICS_FILE
    history = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
    return history


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
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


def _epoch_order(cfg: PretrainConfig, epoch: int) -> torch.Generator:
    """The batch order of ``epoch``: a function of the seed and the epoch alone."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)


@torch.no_grad()
def _probe_batch_stats(run: Run, probe: torch.Tensor, when: str = "") -> dict[str, float]:
    feats = extract_features(run.method.backbone, probe, run.mean, run.std, device=run.device, amp=run.cfg.amp)
    require_finite(feats, f"the features of the probe batch {when}".rstrip())
    return {"effective_rank": effective_rank(feats), "std_of_l2_normalized": std_of_l2_normalized(feats).item()}


def _first_bad(losses: list[torch.Tensor], start_step: int) -> tuple[int, float] | None:
    """``(global step, value)`` of the first non-finite loss among ``losses``, if any."""
    stacked = torch.stack(losses)
    bad = (~torch.isfinite(stacked)).nonzero()
    if bad.numel() == 0:
        return None
    i = int(bad[0, 0])
    return start_step + i, float(stacked[i])


def step_views(run: Run, batches: Iterable[torch.Tensor], augment_rng: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """The augmented views of each uint8 batch of ``batches``, in order.

    In a multi-process run each batch is this process's shard (rows
    :func:`or_core.distributed.shard_rows`) of a global batch ``W`` times as large: every process
    draws the augmentation parameters of the whole global batch from ``augment_rng`` (the same
    stream on every process) and applies those of its own rows.

    In one process with ``cfg.augment_batches = k > 1``, ``k`` consecutive batches are augmented
    in one call and the views cut into per-batch slices: the same per-image transforms, drawn
    in another order (so another, equally reproducible, random stream).
    """
    k = run.cfg.augment_batches
    if k <= 1 or distributed.world_size() > 1:
        for images in batches:
            total = images.shape[0] * distributed.world_size()
            with record_function("augment"):
                views = run.augment(images, generator=augment_rng, rows=distributed.shard_rows(total), total=total)
            yield views
        return
    chunk: list[torch.Tensor] = []

    def flush() -> Iterator[list[torch.Tensor]]:
        with record_function("augment"):
            views = run.augment(torch.cat(chunk), generator=augment_rng)
        start = 0
        for images in chunk:
            stop = start + images.shape[0]
            yield [v[start:stop] for v in views]
            start = stop

    for images in batches:
        chunk.append(images)
        if len(chunk) == k:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def training_step(run: Run, images: torch.Tensor, progress: float, augment_rng: torch.Generator) -> dict[str, torch.Tensor]:
    """One optimization step on a uint8 batch: augment (:func:`step_views`), then
    :func:`optimization_step`."""
    return optimization_step(run, next(step_views(run, [images], augment_rng)), progress)


def optimization_step(run: Run, views: list[torch.Tensor], progress: float) -> dict[str, torch.Tensor]:
    """One optimization step on a batch's augmented views: loss (+ OR term), backward, update.

    Returns the method's loss terms, detached; nothing here waits for the device.
    """
    cfg, method = run.cfg, run.method
    amp = cfg.amp and run.device.type == "cuda"
    if run.compiled is not None:  # a new iteration for CUDA graph trees: the last step's graph outputs are dead
        torch.compiler.cudagraph_mark_step_begin()
    # (the labels name the phases in a torch.profiler trace: benchmarks/step_profile.py)
    with record_function("forward"):
        if amp and cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=amp):
            out = run.module(views, progress)  # method.training_loss, through DDP when wrapped
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


def _raise_non_finite(losses: list[torch.Tensor], first_step: int, epoch: int) -> None:
    if distributed.is_distributed():  # every process stops together if one of them diverged
        losses = list(distributed.all_reduce_mean(torch.stack(losses)))
    bad = _first_bad(losses, first_step)
    if bad is not None:
        raise NonFiniteLossError(
            f"non-finite loss {bad[1]} at step {bad[0]} (epoch {epoch + 1}): training diverged, "
            f"lower the learning rate (--lr) and start again"
        )


def check_finite_weights(method: nn.Module, when: str) -> None:
    """Raise :class:`NonFiniteLossError` naming the first parameter or buffer of ``method``
    with a NaN or infinite value (one wait for the device, whatever the number of tensors)."""
    tensors = [(n, t) for n, t in [*method.named_parameters(), *method.named_buffers()] if t.is_floating_point()]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(finite.all()):
        return
    name = tensors[int(torch.nonzero(~finite)[0])][0]
    raise NonFiniteLossError(
        f"non-finite weights ({name}) {when}: training diverged, lower the learning rate (--lr) and start again"
    )


def require_finite(features: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteLossError` if ``features`` hold a NaN or infinite value: weights
    that are finite yet so large that the forward overflows."""
    if not bool(torch.isfinite(features).all()):
        raise NonFiniteLossError(
            f"non-finite values in {what}: training diverged, lower the learning rate (--lr) and start again"
        )


def _what_is_kept(out: Path, epoch: int, main: bool) -> str:
    """What a stopped run leaves: the last good checkpoint, if one exists."""
    if main and epoch > 0 and (out / CHECKPOINT_FILE).is_file():
        return f"nothing of epoch {epoch + 1} was saved: the last good checkpoint (epoch {epoch}) is kept"
    return "nothing was saved (no checkpoint yet)"


def train_epoch(run: Run, epoch: int, step: int, augment_rng: torch.Generator, bar: tqdm | None) -> tuple[dict, int]:
    """One epoch of training; returns the epoch's mean losses and the new global step.

    Every step's loss is checked for NaN/inf: on the CPU as it is computed, on CUDA in groups
    of 50 steps (reading a result waits for the device). The error names the first bad step;
    the epoch's checkpoint is written only after its last check has passed.
    """
    cfg = run.cfg
    total_steps = cfg.epochs * run.steps_per_epoch
    check_every = 1 if run.device.type == "cpu" else 50
    run.method.train()
    sums = {"ssl_loss": torch.zeros((), device=run.device), "or_term": torch.zeros((), device=run.device)}
    pending: list[torch.Tensor] = []
    pending_start = step
    for views in step_views(run, run.epoch_batches(epoch), augment_rng):
        out = optimization_step(run, views, step / total_steps)
        pending.append(out["loss"])
        if len(pending) >= check_every:
            _raise_non_finite(pending, pending_start, epoch)
            pending, pending_start = [], step + 1
        sums["ssl_loss"] += out["ssl_loss"]
        sums["or_term"] += out["or_term"]
        step += 1
        if bar is not None:
            bar.update(1)
    if pending:
        _raise_non_finite(pending, pending_start, epoch)
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
        return _pretrain(cfg, Path(out), show_progress, stop_after_epochs)
    finally:
        if owns_process_group:
            distributed.destroy_process_group()


def _pretrain(
    cfg: PretrainConfig, out: Path, show_progress: bool, stop_after_epochs: int | None
) -> dict[str, Any]:
    main = distributed.is_main_process()
    if main and out.is_dir():
        _remove_partial_writes(out)
    state = load_checkpoint(out / CHECKPOINT_FILE)
    _prepare_run_dir(cfg, out, state, write=main)
    summary_path = out / SUMMARY_FILE
    run = build_run(cfg)
    augment_rng = torch.Generator().manual_seed(cfg.seed + 1)
    epoch, step, history, wall = 0, 0, [], 0.0
    if state is not None:
        _restore(run, state, augment_rng)
        epoch, step, history, wall = state["epoch"], state["global_step"], state["history"], state["train_wall_time_s"]
        if main:
            _write_metrics(out, history)
        if epoch >= cfg.epochs and summary_path.is_file():
            return json.loads(summary_path.read_text())
        if main:
            where = f"epoch {epoch} of {cfg.epochs} (step {step})" if epoch < cfg.epochs else "its final checkpoint (evaluation)"
            print(f"resuming {out} from {where}", file=sys.stderr, flush=True)
    # the fixed test batch whose statistics metrics.jsonl records every epoch
    probe = load_split_at_most(cfg.dataset, "test", Path(os.path.expanduser(cfg.data_root)), cfg.image_size, 512, cfg.seed).images
    bar = tqdm(total=cfg.epochs * run.steps_per_epoch, initial=step, disable=not (show_progress and main), desc=f"{cfg.method}+{cfg.regularizer}")
    epochs_this_call = 0
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
                _write_metrics(out, history)
            if bar is not None:
                bar.set_postfix(loss=f"{means['ssl_loss']:.3f}", or_term=f"{means['or_term']:.2e}")
    finally:
        bar.close()
    if not main:
        return {"epoch": epoch, "finished": True, "rank": distributed.rank()}
    check_finite_weights(run.method, "before the evaluation")
    summary = evaluate_run(run, history, wall)
    _write_summary(out, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Evaluation of the final weights
# ----------------------------------------------------------------------------------------------
def evaluate_run(run: Run, history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """kNN and linear probe of the final backbone, collapse scalars and provenance."""
    cfg = run.cfg
    root = Path(os.path.expanduser(cfg.data_root))
    backbone = run.method.backbone
    train_feats, train_labels, num_classes = _split_features(run, root, "train", cfg.eval_train_subset)
    test_feats, test_labels, _ = _split_features(run, root, "test", cfg.eval_test_subset)
    require_finite(train_feats, "the features of the evaluation's training images")
    require_finite(test_feats, "the features of the evaluation's test images")
    knn = knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, cfg.knn_k, cfg.knn_t)
    linear = linear_probe_accuracy(
        train_feats, train_labels, test_feats, test_labels, num_classes, epochs=cfg.linear_epochs, seed=cfg.seed
    )
    val = _validation_knn(run, root)
    with torch.no_grad():
        so_total = sum(so_penalty(w.detach()).item() for _, w in regularized_weights(backbone))
    regularizer = run.method.regularizer
    return {
        "method": cfg.method,
        "regularizer": cfg.regularizer,
        "gamma": regularizer.gamma if regularizer is not None else None,
        "backbone": cfg.backbone,
        "width": cfg.width,
        "dataset": cfg.dataset,
        "profile": cfg.profile,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "train_images": run.train_size,
        "image_size": run.image_size,
        "seed": cfg.seed,
        "knn_k": cfg.knn_k,
        "knn_t": cfg.knn_t,
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "linear_top1": linear["top1"],
        "linear_top5": linear["top5"],
        "eval_train_images": len(train_labels),
        "eval_test_images": len(test_labels),
        "val_knn_top1": val["top1"] if val else None,
        "val_images": cfg.val_images if val else None,
        "effective_rank": effective_rank(test_feats),
        "rankme": rankme(test_feats),
        "std_of_l2_normalized": std_of_l2_normalized(test_feats).item(),
        "or_so_total": so_total,
        "final_ssl_loss": history[-1]["ssl_loss"] if history else math.nan,
        "wall_time_s": wall,
        "images_per_s": run.steps_per_epoch * cfg.batch_size * cfg.epochs / wall if wall > 0 else math.nan,
        "device": device_name(run.device),
        "torch": torch.__version__,
        "lightly": lightly.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _split_features(run: Run, root: Path, split: str, subset: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Frozen backbone features, labels and class count of a split (a class-balanced subset of
    ``subset`` images if given). Resident runs decode the split into the tensor cache; a
    streaming run streams it through DataLoader workers (only the features stay in memory)."""
    cfg, backbone = run.cfg, run.method.backbone
    features = lambda images: extract_features(backbone, images, run.mean, run.std, device=run.device, amp=cfg.amp)  # noqa: E731
    if not cfg.stream:
        data = load_split(cfg.dataset, split, root, cfg.image_size, subset, cfg.seed)
        return features(data.images), data.labels, data.num_classes
    loader = streaming_loader(
        resolve_dataset(cfg.dataset, root).root, run.image_size, 256, cfg.num_workers, shuffle=False, split=split,
        seed=cfg.seed, subset=subset,
    )
    feats, labels = [], []
    for images, y in loader:
        feats.append(features(images))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels), len(loader.dataset.classes)


def _validation_knn(run: Run, root: Path) -> dict[str, float] | None:
    """kNN top-1 of held-out training images (:func:`or_core.data.load_holdout`) against the
    pretraining images: the number hyper-parameters are chosen on. ``None`` without a
    ``val_images`` setting or when the run trains on the whole training split."""
    cfg = run.cfg
    if not cfg.val_images or cfg.subset is None or run.train is None:
        return None
    holdout = load_holdout(cfg.dataset, cfg.val_images, cfg.subset, cfg.seed, root, cfg.image_size)
    backbone = run.method.backbone
    bank = extract_features(backbone, run.train.images, run.mean, run.std, device=run.device, amp=cfg.amp)
    queries = extract_features(backbone, holdout.images, run.mean, run.std, device=run.device, amp=cfg.amp)
    return knn_accuracy(
        bank, run.train.labels.to(bank.device), queries, holdout.labels.to(bank.device),
        holdout.num_classes, cfg.knn_k, cfg.knn_t,
    )


def evaluate_dir(out: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-evaluate the last checkpoint of the run in ``out`` and rewrite its ``summary.json``.

    The run's config is the checkpoint's own (``config.yaml`` only for checkpoints without
    one); ``overrides`` change its evaluation fields (``eval_train_subset``,
    ``eval_test_subset``, ``val_images``, ``linear_epochs``, ``knn_k``, ``knn_t``), and sizes
    larger than the data are clipped to it (:func:`or_core.config.fit_to_data`).
    """
    out = Path(out)
    if not out.is_dir():
        raise MissingPathError(f"run directory not found: {out}")
    state = load_checkpoint(out / CHECKPOINT_FILE)
    if state is None:
        raise MissingPathError(f"{out} has no {CHECKPOINT_FILE} to evaluate: train it first (python -m or_core pretrain --out {out})")
    saved = state.get("config")
    if saved is None and (out / CONFIG_FILE).is_file():
        saved = yaml.safe_load((out / CONFIG_FILE).read_text())
    if saved is None:
        raise MissingPathError(f"{out} holds neither a checkpoint config nor {CONFIG_FILE}")
    overrides = dict(overrides or {})
    not_evaluation = sorted(set(overrides) - set(EVALUATION_FIELDS))
    if not_evaluation:
        raise ConfigError(f"evaluate changes only {', '.join(EVALUATION_FIELDS)}; not {not_evaluation}")
    cfg = fit_to_data(PretrainConfig.from_dict({**saved, **overrides}, str(out / CHECKPOINT_FILE)))
    run = build_run(cfg)
    run.method.load_state_dict(state["method"])
    check_finite_weights(run.method, f"in {out / CHECKPOINT_FILE} (epoch {state['epoch']})")
    summary = evaluate_run(run, state["history"], state["train_wall_time_s"])
    summary["evaluated_epoch"] = state["epoch"]
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically (temporary file, fsync, rename)."""
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
