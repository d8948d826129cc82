"""LARS that never waits for the GPU: lightly's optimizer, with its step computed on the device.

lightly's ``LARS.step`` (``lightly.utils.lars``) decides ``if p_norm != 0 and g_norm != 0`` per
parameter on device tensors. On CUDA each such test copies a scalar to the host and waits for
every queued kernel: two waits per decayed weight, about 60 per BYOL step with a ResNet-18. The
host then cannot queue the next step while the GPU computes this one. This subclass computes
the same update with ``torch.where`` instead of a Python ``if``, and the norms, momentum and
parameter updates with ``torch._foreach_*`` ops (a few launches per group instead of several
per parameter). On the CPU its result equals lightly's bit for bit (``tests/test_lars.py``).

For a parameter ``p`` with gradient ``g`` in a group with weight decay ``wd``, trust coefficient
``eta``, momentum ``mu``, dampening ``tau`` and learning rate ``lr`` (as in lightly)::

    d   = eta * ||p|| / (||g|| + wd * ||p|| + eps) * (g + wd * p)    if wd != 0, ||p|| != 0, ||g|| != 0
    d   = g                                                          otherwise
    buf = d  (first step),  buf = mu * buf + (1 - tau) * d  (later steps)
    d   = buf,  or  d + mu * buf  with Nesterov momentum
    p   = p - lr * d
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightly.utils.lars import LARS as LightlyLARS
from torch import Tensor

__all__ = ["LARS"]


class LARS(LightlyLARS):
    """lightly's LARS (same arguments, parameter groups and ``momentum_buffer`` state), with a
    step that never synchronizes with the host; see the module docstring."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            updates = self._scaled_gradients(params, grads, group) if group["weight_decay"] != 0 else grads
            if group["momentum"] != 0:
                updates = self._momentum(params, updates, group)
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss

    @staticmethod
    def _scaled_gradients(params: list[Tensor], grads: list[Tensor], group: dict) -> list[Tensor]:
        """``eta * ||p|| / (||g|| + wd ||p|| + eps) * (g + wd p)``, or ``g`` where a norm is 0.

        The per-parameter scalars are computed on stacked norms (the same float operations as
        lightly's, element by element), so only the scaling and the choice run per parameter."""
        weight_decay = group["weight_decay"]
        param_norms = torch.stack(torch._foreach_norm(params))
        grad_norms = torch.stack(torch._foreach_norm(grads))
        lars_lr = param_norms / (grad_norms + param_norms * weight_decay + group["eps"]) * group["trust_coefficient"]
        scale = (param_norms != 0) & (grad_norms != 0)
        decayed = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(decayed, list(lars_lr.unbind()))
        return [torch.where(use, d, g) for use, d, g in zip(scale.unbind(), decayed, grads)]

    def _momentum(self, params: list[Tensor], updates: list[Tensor], group: dict) -> list[Tensor]:
        """Update the momentum buffers with ``updates``; return what the parameters move by."""
        momentum = group["momentum"]
        buffers, old_buffers, old_updates = [], [], []
        for p, d in zip(params, updates):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.clone(d).detach()
            else:
                old_buffers.append(state["momentum_buffer"])
                old_updates.append(d)
            buffers.append(state["momentum_buffer"])
        if old_buffers:
            torch._foreach_mul_(old_buffers, momentum)
            torch._foreach_add_(old_buffers, old_updates, alpha=1 - group["dampening"])
        if group["nesterov"]:
            return torch._foreach_add(updates, buffers, alpha=momentum)
        return buffers
