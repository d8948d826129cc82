"""Deferred checks: NaN/inf checks read from the device in groups, not one value at a time.

Why: reading a check's result on the host waits for all queued GPU work; a check of every
step's loss as it is computed would stop the host from running ahead of the GPU each step,
and a check of every weight one at a time would wait once per tensor (measurements:
results/benchmarks/NOTES.md#deferred-checks). What is checked, and the errors, are
:mod:`or_core.divergence`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["CUDA_CHECK_EVERY", "DeferredLossCheck", "first_non_finite"]

#: Steps whose losses are checked together on a GPU (on the CPU every step is checked at once).
CUDA_CHECK_EVERY = 50


def first_non_finite(values: Sequence[Tensor]) -> int | None:
    """The index of the first of ``values`` holding a NaN or an infinity, ``None`` if every one
    is finite: one wait for the device, whatever the number of tensors."""
    finite = torch.stack([torch.isfinite(v).all() for v in values])
    if bool(finite.all()):
        return None
    return int(torch.nonzero(~finite)[0])


class DeferredLossCheck:
    """Each step's loss, handed to ``check(losses, first_step)`` in groups: every step on the
    CPU, every :data:`CUDA_CHECK_EVERY` steps elsewhere. ``check`` raises on a bad loss; call
    :meth:`flush` at the end of the steps (before anything of them is saved) for the last group.

    Args:
        device: where the losses are computed.
        first_step: the global step of the first loss added.
        check: called with the pending losses and the global step of the first of them.
    """

    def __init__(self, device: torch.device, first_step: int, check: Callable[[list[Tensor], int], None]) -> None:
        self.every = 1 if device.type == "cpu" else CUDA_CHECK_EVERY
        self._check = check
        self._first_step = first_step
        self._pending: list[Tensor] = []

    def add(self, loss: Tensor) -> None:
        """Queue the loss of the next step; check the group once it is full."""
        self._pending.append(loss)
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Check the losses queued so far, if any."""
        if self._pending:
            self._check(self._pending, self._first_step)
            self._first_step += len(self._pending)
            self._pending = []
