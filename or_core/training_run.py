"""The pieces of one training run, built from its config: device, data, backbone, method (with
its OR switch), augmentation, optimizer and schedule (:func:`build_run`), held in a
:class:`Run`.

:mod:`or_core.train` trains a :class:`Run`; to get a trained model back from its run directory,
:func:`or_core.measure.load_trained` builds only the method (no data, optimizer or compilation).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from or_core import distributed
from or_core.augment import MultiViewAugment
from or_core.backbones import build_backbone
from or_core.config import PretrainConfig
from or_core.data import ImageTensors, batch_indices, load_split, resolve_dataset, streaming_loader
from or_core.errors import ConfigError, DataError
from or_core.fast_path.compiled_calls import compile_encoders, compile_mode, compile_regularizer
from or_core.methods import SSLMethod, build_method, method_class
from or_core.optim import build_optimizer, build_scheduler

__all__ = ["Run", "build_run", "select_device", "epoch_order"]


def trains_in_cpu_bf16(cfg: PretrainConfig, device: torch.device) -> bool:
    """Whether the run trains under bfloat16 autocast on the CPU: ``cpu_bf16`` asked for it and
    oneDNN has native bfloat16 kernels here (elsewhere emulating them would be slower than float32)."""
    return device.type == "cpu" and cfg.cpu_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def select_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(kw_only=True)
class Run:
    """The pieces of one run, built from its config (see :func:`build_run`).

    ``module`` runs the forward: the ``DistributedDataParallel`` wrapper of ``method`` in a
    multi-process run, ``method`` itself otherwise. ``method`` is always the unwrapped method
    (hooks, ``state_dict``, evaluation). ``compiled`` is the ``torch.compile`` mode applied to
    its encoders, if any (:mod:`or_core.fast_path.compiled_calls`). Built with keywords only.
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

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The uint8 training batches of ``epoch`` with the positions of their images in the
        training set, ``(images, indices)`` on the device, in an order that is a function of the
        seed and the epoch alone (so a resumed run sees the same batches).

        In a multi-process run each is this process's shard of a global batch, its rows
        :func:`or_core.distributed.shard_rows` (the loader of a streamed run decodes only those);
        in one process the whole batch."""
        rows = distributed.shard_rows(self.cfg.batch_size)
        # the loader's SeededBatchSampler draws the same permutation from an equal generator
        positions = batch_indices(self.train_size, self.cfg.batch_size, True, epoch_order(self.cfg, epoch), rows=rows)
        if self.loader is None:
            for idx in positions:
                idx = idx.to(self.device, non_blocking=True)
                yield self.train.images[idx], idx
            return
        self.loader.batch_sampler.generator = epoch_order(self.cfg, epoch)
        for (images, _), idx in zip(self.loader, positions, strict=True):
            yield images.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)


def epoch_order(cfg: PretrainConfig, epoch: int) -> torch.Generator:
    """The batch order of ``epoch``: a function of the seed and the epoch alone."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)



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


def _check_method_kwargs(cfg: PretrainConfig) -> None:
    """``method_kwargs`` must be arguments of the method's constructor (named in the error)."""
    parameters = inspect.signature(method_class(cfg.method).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    # num_samples is the training set's size, which build_run passes
    valid = sorted(set(parameters) - {"self", "backbone", "feature_dim", "regularizer", "gamma", "num_samples"})
    unknown = sorted(set(cfg.method_kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"method_kwargs: {cfg.method} takes no {unknown}; valid: {', '.join(valid)}")


def initial_backbone(cfg: PretrainConfig, image_size: int) -> tuple[nn.Module, int]:
    """The encoder of a run as it starts training, and its feature size: ``cfg.backbone`` at
    ``cfg.width`` for ``image_size`` pixels, built right after ``torch.manual_seed(cfg.seed)``, so
    that every method of one seed starts from the same weights (and the evaluation can rebuild
    them as the untrained reference, :func:`or_core.evaluate.untrained_knn`)."""
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone, image_size=image_size, width=cfg.width)


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
    # Built after loading: decoding a split the first time draws from the global RNG
    # (DataLoader workers), which must not change the initial weights.
    backbone, feature_dim = initial_backbone(cfg, image_size)
    method_kwargs = distributed.method_kwargs(cfg.method, cfg.method_kwargs)
    if "num_samples" in inspect.signature(method_class(cfg.method).__init__).parameters:
        method_kwargs["num_samples"] = train_size  # a method that keeps one entry per training image
    method = build_method(
        cfg.method, backbone, feature_dim, regularizer=cfg.regularizer, gamma=cfg.gamma, **method_kwargs
    ).to(device)
    # CUDA only (and bfloat16 CPU training): on the CPU in float32, oneDNN's channels-last is
    # faster but its gradients are far less accurate than NCHW's
    # (measurements: results/benchmarks/NOTES.md#cpu-channels-last).
    if (device.type == "cuda" and cfg.channels_last) or trains_in_cpu_bf16(cfg, device):
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
    scheduler = build_scheduler(optimizer, method, cfg, steps_per_epoch)
    if mode is not None:
        compile_encoders(method, mode)
        if cfg.compile_or:
            compile_regularizer(method, mode)
    return Run(
        cfg=cfg, device=device, method=method, augment=augment, optimizer=optimizer, scheduler=scheduler,
        train=train.to(device) if train is not None else None, steps_per_epoch=steps_per_epoch,
        mean=tuple(views[0].mean), std=tuple(views[0].std), module=module, loader=loader,
        train_size=train_size, image_size=image_size, compiled=mode,
    )
