"""Host-sync avoidance: integer counters kept on the device and mirrored on the host.

Why: reading a CUDA tensor's value (``int(t)``) makes the host wait for all queued GPU work, so
a counter read every step (a memory bank's write pointer, SwaV's count of queued entries)
stops the host from running ahead of the GPU (measurements:
results/benchmarks/NOTES.md#host-sync-avoidance). The counters stay buffers, saved in
``state_dict`` for an exact resume; their value is read once and mirrored on the host.

Two private names are used because no public API offers the same: ``Tensor._version`` (the
in-place version counter that tells a stale mirror from a valid one) and lightly's
``MemoryBankModule._dequeue_and_enqueue`` (the only place its write pointer is read; lightly has
no hook to replace that read).
"""

from __future__ import annotations

import functools

import torch
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import concat_all_gather
from lightly.utils import dist
from torch import Tensor, nn

__all__ = ["enqueue_without_host_sync", "read_counter", "write_counter"]


def read_counter(module: nn.Module, name: str) -> int:
    """The value of the one-element integer buffer ``module.<name>``, kept on the host.

    The value is read once and mirrored on the host, together with the tensor and its in-place
    version counter; :func:`write_counter` updates both. A tensor that was replaced (``.to``, a
    new buffer) or changed in place by other code (``load_state_dict`` copies into it) is read
    again.
    """
    tensor = getattr(module, name)
    mirror = module.__dict__.get("_host_counters", {}).get(name)
    if mirror is not None and mirror[0] is tensor and mirror[1] == tensor._version:
        return mirror[2]
    value = int(tensor)
    module.__dict__.setdefault("_host_counters", {})[name] = (tensor, tensor._version, value)
    return value


def write_counter(module: nn.Module, name: str, value: int) -> None:
    """Set the buffer ``module.<name>`` to ``value`` (no host synchronization) and its mirror."""
    tensor = getattr(module, name)
    tensor.fill_(value)
    module.__dict__.setdefault("_host_counters", {})[name] = (tensor, tensor._version, value)


def _enqueue(bank: MemoryBankModule, batch: Tensor) -> None:
    """lightly's ``MemoryBankModule._dequeue_and_enqueue`` with its write pointer read through
    :func:`read_counter`: the same writes, without lightly's ``int(self.bank_ptr)``."""
    if bank.gather_distributed and dist.world_size() > 1:
        batch = concat_all_gather(batch)
    size, n = bank.size[0], batch.shape[0]
    ptr = read_counter(bank, "bank_ptr")
    with torch.no_grad():
        if ptr + n >= size:
            bank.bank[ptr:] = batch[: size - ptr].detach()
            write_counter(bank, "bank_ptr", 0)
        else:
            bank.bank[ptr : ptr + n] = batch.detach()
            write_counter(bank, "bank_ptr", ptr + n)


def enqueue_without_host_sync(bank: MemoryBankModule) -> MemoryBankModule:
    """Let a lightly memory bank enqueue with its write pointer mirrored on the host
    (:func:`read_counter`) instead of read from the device every step; returns ``bank``."""
    bank._dequeue_and_enqueue = functools.partial(_enqueue, bank)  # type: ignore[method-assign]
    return bank
