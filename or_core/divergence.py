"""Divergence: a loss, a weight or a feature that became NaN or infinite stops the run with an
error that says what to do (lower the learning rate), before anything of it is saved."""

from __future__ import annotations

import torch
from torch import nn

from or_core import distributed
from or_core.errors import InputError
from or_core.fast_path.deferred_checks import first_non_finite

__all__ = ["NonFiniteLossError", "check_finite_losses", "check_finite_weights", "require_finite"]

_FIX = "training diverged, lower the learning rate (--lr) and start again"


class NonFiniteLossError(InputError, FloatingPointError):
    """The loss or the weights became NaN or infinite (a learning rate too high, most often);
    nothing of the diverged step is saved, the last good checkpoint (if any) is left untouched."""


def check_finite_losses(losses: list[torch.Tensor], first_step: int, epoch: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first of ``losses`` (the losses of
    consecutive steps from global step ``first_step``, in epoch ``epoch``, counted from 0) that
    is NaN or infinite. In a multi-process run every process stops together if one diverged."""
    if distributed.is_distributed():
        losses = list(distributed.all_reduce_mean(torch.stack(losses)))
    bad = first_non_finite(losses)
    if bad is not None:
        raise NonFiniteLossError(
            f"non-finite loss {float(losses[bad])} at step {first_step + bad} (epoch {epoch + 1}): {_FIX}"
        )


def check_finite_weights(method: nn.Module, when: str) -> None:
    """Raise :class:`NonFiniteLossError` naming the first parameter or buffer of ``method``
    with a NaN or infinite value."""
    tensors = [(n, t) for n, t in [*method.named_parameters(), *method.named_buffers()] if t.is_floating_point()]
    if not tensors:
        return
    bad = first_non_finite([t for _, t in tensors])
    if bad is not None:
        raise NonFiniteLossError(f"non-finite weights ({tensors[bad][0]}) {when}: {_FIX}")


def require_finite(features: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteLossError` if ``features`` hold a NaN or infinite value: weights
    that are finite yet so large that the forward overflows."""
    if not bool(torch.isfinite(features).all()):
        raise NonFiniteLossError(f"non-finite values in {what}: {_FIX}")
