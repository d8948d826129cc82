"""Multi-process training with ``torch.distributed``: DDP launched by ``torchrun``.

Launch one process per GPU; the training loop (:func:`or_core.train.pretrain`) reads the
``torchrun`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), and with more than one
process it:

* initializes the process group (:func:`init_process_group`): NCCL with device
  ``cuda:LOCAL_RANK`` when the run is on CUDA, gloo on the CPU;
* builds each method with ``gather_distributed=True`` where its constructor takes it
  (:func:`method_kwargs`): SimCLR and NNCLR then take the negatives of all processes
  (lightly's ``gather_distributed``), MoCo enqueues the keys of all processes, Barlow Twins and
  VICReg compute their statistics over the global batch, SwaV runs Sinkhorn over it;
* synchronizes batch norm across processes and wraps the method in
  ``DistributedDataParallel`` (:func:`wrap_method`);
* shards every global batch (:func:`shard_rows`): ``batch_size`` in the config is the global
  batch ``B`` (it must be divisible by ``W``), and every process draws the same permutation of
  the training set (seeded by the seed and the epoch alone) but loads only its contiguous rows
  ``[rank * B / W, (rank + 1) * B / W)`` of each global batch: resident data is indexed by them
  (:func:`or_core.data.batches` with ``rows``), and with ``stream: true`` the
  :class:`~or_core.data.SeededBatchSampler` hands only them to the DataLoader workers, so each
  process decodes ``B / W`` JPEGs per step, not ``B``. Each process then augments its rows with
  the parameters of the whole global batch: :class:`~or_core.augment.MultiViewAugment` with
  ``rows`` and ``total`` draws the random parameters of all ``B`` images from the same seeded
  generator as every other process (the generator advances exactly as in a single-process run,
  so a resumed run stays exact) and applies those of its rows. Every augmentation op works image
  by image, so the views are (up to float32 rounding: kernels, BLAS ones on the CPU included,
  may be chosen by the number of rows) rows ``[rank * B / W, (rank + 1) * B / W)`` of the views of a single-process run
  with the same global batch, at ``1 / W`` of its decoding and augmentation work per process;
* writes the run directory, shows the progress bar and evaluates on rank 0 only (every
  process loads the checkpoint to resume).

With the same global batch, seed and config, a ``W``-process run follows the single-process run
up to floating-point summation order (gradients are averaged by an all-reduce, batch-norm sums
are added across processes). In float32 a few steps can take the two 4-14% apart (a rounding
flips ReLUs, and training amplifies it), so the equivalence is tested in float64
(``tests/test_distributed.py``). Single-process runs do not touch any of this: no process group, no
wrapping.

Eight GPUs on one machine::

    torchrun --standalone --nproc_per_node 8 -m or_core pretrain --profile gpu \\
        --method simclr --regularizer so --out runs/simclr_so

Batch norm: on CUDA, ``torch.nn.SyncBatchNorm``. That module only runs on GPUs ("SyncBatchNorm
expected input tensor to be on GPU"), so CPU (gloo) runs use :class:`CPUSyncBatchNorm`, a small
differentiable synchronized batch norm: one all-reduce of the per-channel sum, sum of squares
and count per layer, whose backward is again an all-reduce (:func:`differentiable_all_reduce`),
so gradients reach the inputs of every process. It exists so that CPU multi-process runs (and
the test that compares them with one process) normalize with the statistics of the global
batch, as one process does.

DDP does not broadcast buffers at every forward (``forward_sync_buffers=False``, or
``broadcast_buffers=False`` in torch versions without that keyword): synchronized batch norm keeps the running
statistics identical on all processes, EMA targets are updated from identical weights, and
gathered memory banks (MoCo, SwaV) receive identical keys. NNCLR's support set stays per
process; a checkpoint holds rank 0's, which every process loads on resume.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "CPUSyncBatchNorm",
    "all_reduce_mean",
    "check_batch_size",
    "convert_cpu_sync_batchnorm",
    "destroy_process_group",
    "differentiable_all_reduce",
    "env_world_size",
    "init_process_group",
    "is_distributed",
    "is_main_process",
    "launched_with_torchrun",
    "local_device",
    "local_rank",
    "method_kwargs",
    "rank",
    "shard_rows",
    "world_size",
    "wrap_method",
]


# ----------------------------------------------------------------------------------------------
# Environment and process group
# ----------------------------------------------------------------------------------------------
def env_world_size() -> int:
    """``WORLD_SIZE`` of the environment (set by ``torchrun``), 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_with_torchrun() -> bool:
    """Whether the environment describes a multi-process launch (``WORLD_SIZE`` > 1, ``RANK`` set)."""
    return env_world_size() > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group, 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the process group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """``LOCAL_RANK`` (set by ``torchrun``); else the rank modulo the visible GPUs (or 0)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    n_gpus = torch.cuda.device_count()
    return rank() % n_gpus if n_gpus else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the process that writes files and evaluates."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA ``device`` in a multi-process run; ``device`` otherwise."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def init_process_group(device: torch.device) -> bool:
    """Initialize the default process group from the ``torchrun`` environment.

    NCCL on ``cuda:LOCAL_RANK`` (made the current device) when ``device`` is a CUDA device,
    gloo otherwise. Nothing happens in a single process (``WORLD_SIZE`` unset or 1) or when a
    process group already exists.

    Returns:
        whether this call created the process group (the caller then destroys it with
        :func:`destroy_process_group`).
    """
    if not launched_with_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    if device.type == "cuda":
        cuda = torch.device("cuda", local_rank())
        torch.cuda.set_device(cuda)
        dist.init_process_group("nccl", device_id=cuda)
    else:
        dist.init_process_group("gloo")
    return True


def destroy_process_group() -> None:
    """Destroy the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Methods and data
# ----------------------------------------------------------------------------------------------
def method_kwargs(method: str | type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``gather_distributed=True`` in a multi-process run, if the method takes it.

    ``method`` is a registry name or a method class; an explicit ``gather_distributed`` in
    ``kwargs`` is kept.
    """
    kwargs = dict(kwargs)
    if not is_distributed():
        return kwargs
    if isinstance(method, str):
        from or_core.methods import method_class

        method = method_class(method)
    if "gather_distributed" in inspect.signature(method.__init__).parameters:
        kwargs.setdefault("gather_distributed", True)
    return kwargs


def check_batch_size(batch_size: int) -> None:
    """Raise ``ValueError`` unless the global ``batch_size`` splits evenly across the processes."""
    world = world_size()
    if batch_size % world != 0:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {world} processes: batch_size is the "
            f"global batch, and every process trains on batch_size / {world} of its images"
        )


def shard_rows(batch_size: int) -> tuple[int, int]:
    """This process's rows ``[rank * B / W, (rank + 1) * B / W)`` of a global batch of ``B``.

    ``(0, batch_size)`` in a single process.

    Raises:
        ValueError: ``batch_size`` does not split evenly across the processes.
    """
    world = world_size()
    if batch_size % world != 0:
        raise ValueError(f"a batch of {batch_size} images does not split evenly across {world} processes")
    n = batch_size // world
    return rank() * n, (rank() + 1) * n


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over the processes (a new tensor); ``tensor`` itself in one process."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out.div_(world_size())


# ----------------------------------------------------------------------------------------------
# Synchronized batch norm on the CPU
# ----------------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """``y = sum over processes of x``; backward: ``dx = sum over processes of dy``."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def differentiable_all_reduce(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the processes, with gradients (the backward is an all-reduce).

    Every process's output depends on every process's input, so the gradient of the sum of the
    processes' losses with respect to a local input is the sum of the local output gradients.
    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated.)
    """
    return _AllReduceSum.apply(tensor)


class CPUSyncBatchNorm(_BatchNorm):
    """Batch norm over the batches of all processes, differentiable, for gloo (CPU) runs.

    In training mode (or without running statistics) every process sums, per channel, its
    inputs, their squares and their count (in float64); one all-reduce of those sums
    (:func:`differentiable_all_reduce`) gives the mean and the biased variance of the global
    batch, which normalize the local inputs. The running
    statistics are updated as ``nn.BatchNorm*d`` does (momentum, or a cumulative average when
    ``momentum=None``; unbiased variance), identically on every process. In eval mode, or
    without a process group, it is plain batch norm. Inputs are ``(N, C, *)``, as for
    ``nn.BatchNorm1d/2d/3d``; ``state_dict`` keys are those of ``nn.BatchNorm*d``.

    ``torch.nn.SyncBatchNorm`` does the same on GPUs only; use it there.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *), got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats or not is_distributed():
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        local_count = input.numel() // channels
        sums = torch.cat([
            input.sum(dims, dtype=torch.float64),
            (input * input).sum(dims, dtype=torch.float64),
            torch.full((1,), float(local_count), dtype=torch.float64, device=input.device),
        ])
        sums = differentiable_all_reduce(sums)
        count = sums[-1]
        if count.item() <= 1:
            raise ValueError(
                f"expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
            )
        mean = sums[:channels] / count
        var = (sums[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)

        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1))
                self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

        shape = [1, channels] + [1] * (input.dim() - 2)
        inv_std = torch.rsqrt(var + self.eps)
        out = (input - mean.to(input.dtype).view(shape)) * inv_std.to(input.dtype).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every batch-norm layer of ``module`` by a :class:`CPUSyncBatchNorm`.

    The new layers share the old ones' parameters and buffers (an optimizer built before keeps
    working) and their train/eval mode. Returns ``module`` (or the new layer if ``module`` is a
    batch norm itself).
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, (CPUSyncBatchNorm, nn.SyncBatchNorm)):
        new = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        new_child = convert_cpu_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def wrap_method(method: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(method)`` with synchronized batch norm; ``method`` in one process.

    Batch-norm layers are converted in place (``torch.nn.SyncBatchNorm`` on CUDA,
    :class:`CPUSyncBatchNorm` on the CPU), so ``method`` itself, the object the hooks, the
    ``state_dict`` and evaluation use, stays the module DDP wraps. Call it after moving
    ``method`` to ``device``.
    """
    if not is_distributed():
        return method
    from torch.nn.parallel import DistributedDataParallel

    # No buffer broadcast at every forward (the keyword was renamed in recent torch versions).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_buffer_sync = {"forward_sync_buffers": False}
    else:
        no_buffer_sync = {"broadcast_buffers": False}
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(method)
        return DistributedDataParallel(method, device_ids=[device], **no_buffer_sync)
    convert_cpu_sync_batchnorm(method)
    return DistributedDataParallel(method, **no_buffer_sync)
