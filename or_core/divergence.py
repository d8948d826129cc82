"""Divergence: a loss, a weight or a feature that became NaN or infinite stops the run with an
error that says what to do (lower the learning rate), before anything of it is saved."""

from __future__ import annotations

import torch
from torch import nn

from or_core.errors import InputError

__all__ = ["NonFiniteLossError", "check_finite_weights", "require_finite"]


class NonFiniteLossError(InputError, FloatingPointError):
    """The loss or the weights became NaN or infinite (a learning rate too high, most often);
    nothing of the diverged step is saved, the last good checkpoint (if any) is left untouched."""


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
