"""Batched augmentation calls: several training batches augmented in one call.

Why: one call of the batched augmentation (:class:`or_core.augment.MultiViewAugment`) issues
about 1,300 small tensor ops whatever the batch size, so on a GPU its host time, not the
device, bounds a step; ``augment_batches = k`` spreads that cost over ``k`` batches
(measurements: results/benchmarks/NOTES.md#batched-augmentation-gpu).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from or_core import distributed

if TYPE_CHECKING:
    from or_core.training_run import Run

__all__ = ["step_views"]


def step_views(run: Run, batches: Iterable[torch.Tensor], augment_rng: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """The augmented views of each uint8 batch of ``batches``, in order.

    The plain path, one call per batch: in a multi-process run each batch is this process's
    shard (rows :func:`or_core.distributed.shard_rows`) of a global batch ``W`` times as large;
    every process draws the augmentation parameters of the whole global batch from
    ``augment_rng`` (the same stream on every process) and applies those of its own rows.

    In one process with ``cfg.augment_batches = k > 1``, ``k`` consecutive batches are augmented
    in one call and the views cut into per-batch slices: the same per-image transforms, drawn
    in another order (so another, equally reproducible, random stream).
    """
    k = run.cfg.augment_batches
    if k <= 1 or distributed.world_size() > 1:
        for images in batches:
            total = images.shape[0] * distributed.world_size()
            with record_function("augment"):  # the phase's label in a torch.profiler trace
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
