"""LARS that never waits for the GPU: lightly's optimizer with solo-learn's two options, its step
computed on the device.

lightly's ``LARS.step`` (``lightly.utils.lars``) decides ``if p_norm != 0 and g_norm != 0`` per
parameter on device tensors. On CUDA each such test copies a scalar to the host and waits for
every queued kernel: two waits per decayed weight, about 60 per BYOL step with a ResNet-18. The
host then cannot queue the next step while the GPU computes this one. This subclass computes
the same update with ``torch.where`` instead of a Python ``if``, and the norms, momentum and
parameter updates with ``torch._foreach_*`` ops (a few launches per group instead of several
per parameter). On the CPU its result equals lightly's bit for bit (``tests/test_lars.py``).

solo-learn's LARS (``solo/utils/lars.py``, the optimizer of its recipes) adds two options, here
too: ``clip_lr`` and ``exclude_bias_n_norm``; its ``eta`` is lightly's ``trust_coefficient``.
solo-learn's CIFAR recipes (``scripts/pretrain/cifar/*.yaml``) set ``eta: 0.02, clip_lr: True,
exclude_bias_n_norm: True``; its ImageNet BYOL recipe (``scripts/pretrain/imagenet/byol.yaml``)
``eta: 0.001, clip_lr: False, exclude_bias_n_norm: True``.

For a parameter ``p`` with gradient ``g`` in a group with weight decay ``wd``, trust coefficient
``eta``, momentum ``mu``, dampening ``tau`` and learning rate ``lr``::

    r   = eta * ||p|| / (||g|| + wd * ||p|| + eps)
    r   = min(r / lr, 1)                         with clip_lr (so that lr * r <= lr)
    d   = r * (g + wd * p)                       if p is adapted and ||p|| != 0 and ||g|| != 0
    d   = g                                      otherwise
    buf = d  (first step),  buf = mu * buf + (1 - tau) * d  (later steps)
    d   = buf,  or  d + mu * buf  with Nesterov momentum
    p   = p - lr * d

Which parameters are adapted: with ``exclude_bias_n_norm=False`` (lightly's rule) every parameter
of a group whose weight decay is not 0; with ``exclude_bias_n_norm=True`` (solo-learn's rule)
every parameter that is not one-dimensional (biases and normalization weights), whatever its
group's weight decay. With the groups that ``or_core.optim.build_optimizer`` makes (biases and
normalization parameters, all one-dimensional, in a group without weight decay) both rules
adapt the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightly.utils.lars import LARS as LightlyLARS
from torch import Tensor

__all__ = ["LARS"]


class LARS(LightlyLARS):
    """lightly's LARS (same arguments, parameter groups and ``momentum_buffer`` state), plus
    solo-learn's ``clip_lr`` and ``exclude_bias_n_norm`` (both off by default: lightly's update),
    with a step that never synchronizes with the host; see the module docstring."""

    def __init__(
        self, params: Any, lr: float, *, clip_lr: bool = False, exclude_bias_n_norm: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(params, lr, **kwargs)
        for group in self.param_groups:
            group.setdefault("clip_lr", clip_lr)
            group.setdefault("exclude_bias_n_norm", exclude_bias_n_norm)
        self.defaults.update(clip_lr=clip_lr, exclude_bias_n_norm=exclude_bias_n_norm)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("clip_lr", False)
            group.setdefault("exclude_bias_n_norm", False)

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
            updates = [p.grad for p in params]
            if group.get("exclude_bias_n_norm", False):
                adapted = [i for i, p in enumerate(params) if p.ndim != 1]
            else:
                adapted = list(range(len(params))) if group["weight_decay"] != 0 else []
            if adapted:
                scaled = self._scaled_gradients([params[i] for i in adapted], [updates[i] for i in adapted], group)
                for i, d in zip(adapted, scaled):
                    updates[i] = d
            if group["momentum"] != 0:
                updates = self._momentum(params, updates, group)
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss

    @staticmethod
    def _scaled_gradients(params: list[Tensor], grads: list[Tensor], group: dict) -> list[Tensor]:
        """``r * (g + wd p)`` with ``r = eta ||p|| / (||g|| + wd ||p|| + eps)`` (``min(r / lr, 1)``
        with ``clip_lr``), or ``g`` where a norm is 0.

        The per-parameter scalars are computed on stacked norms (the same float operations as
        lightly's and solo-learn's, element by element), so only the scaling and the choice run
        per parameter."""
        weight_decay = group["weight_decay"]
        param_norms = torch.stack(torch._foreach_norm(params))
        grad_norms = torch.stack(torch._foreach_norm(grads))
        lars_lr = param_norms / (grad_norms + param_norms * weight_decay + group["eps"]) * group["trust_coefficient"]
        if group.get("clip_lr", False):
            lars_lr = torch.clamp(lars_lr / group["lr"], max=1.0)
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
