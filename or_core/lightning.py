"""Orthogonality regularization as a drop-in: a PyTorch Lightning callback, or three lines.

In a plain PyTorch loop, build the regularizer once on the encoder and add it to the loss::

    regularizer = OrthogonalityRegularizer(model.backbone, kind="so", gamma=1e-6)
    loss = ssl_loss + regularizer()   # every step
    loss.backward()

In Lightning (2.x, ``pip install "or-core[lightning]"``), add the callback to the trainer; the
``LightningModule`` stays as it is::

    trainer = Trainer(callbacks=[OrthogonalityCallback(kind="so", gamma=1e-6, module="backbone")])

How the callback adds to the loss: a callback cannot change the loss that Lightning
backpropagates (``on_before_backward`` only sees it). So at ``on_fit_start``, once the model is
on its device, the callback wraps the module's ``training_step`` (an instance attribute, which
Lightning looks up by name, also through the DDP wrapper); the wrapper adds ``regularizer()`` to
the returned loss (a tensor, or the ``"loss"`` of a dict) and logs the term as ``or_term``.
Lightning then backpropagates, scales (gradient accumulation, AMP) and clips the sum like any
loss: the OR gradient ``gamma * dOR/dW`` is in every weight's ``.grad`` before the optimizer step.
``on_fit_end`` restores the original method. Manual optimization is refused: there the module
calls ``manual_backward`` itself and has to add ``regularizer()`` to its loss as above.

The ``lightning`` package is an optional extra; :mod:`or_core` never imports this module itself.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from or_core.orthogonality import OrthogonalityRegularizer, PenaltyKind

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "or_core.lightning needs PyTorch Lightning 2.x: pip install 'or-core[lightning]' (or pip install lightning)"
    ) from error

__all__ = ["OrthogonalityCallback"]


class OrthogonalityCallback(Callback):
    """Add ``gamma * sum_l OR(W_l)`` over the conv and linear weights of ``pl_module.<module>``
    to the training loss, and log it as ``log_name``.

    Args:
        kind: the penalty, ``"so"``, ``"srip"``, ... (see :class:`OrthogonalityRegularizer`).
        gamma: its weight; ``None`` takes :data:`or_core.orthogonality.DEFAULT_GAMMA`.
        module: the dotted name of the submodule to regularize (the encoder, e.g. ``"backbone"``;
            ``""`` for the whole ``LightningModule``). Regularize the online encoder only, not
            momentum copies or heads, as He et al. do.
        log_name: the name the term is logged under (each step, on the progress bar).
        **regularizer_kwargs: ``include``, ``exclude``, ``n_power_iterations`` of
            :class:`OrthogonalityRegularizer`.

    After ``on_fit_start``, :attr:`regularizer` is the regularizer in use.
    """

    def __init__(
        self,
        kind: PenaltyKind | str = "so",
        gamma: float | None = None,
        module: str = "backbone",
        log_name: str = "or_term",
        **regularizer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.kind, self.gamma, self.module, self.log_name = kind, gamma, module, log_name
        self.regularizer_kwargs = regularizer_kwargs
        self.regularizer: OrthogonalityRegularizer | None = None
        self._pending_state: dict[str, Tensor] | None = None
        # Checks kind, gamma and the kwargs now, not after the trainer has set everything up.
        OrthogonalityRegularizer(torch.nn.Linear(2, 2), kind, gamma, **regularizer_kwargs)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "OrthogonalityCallback adds its term to the loss training_step returns, which manual "
                "optimization does not backpropagate: add regularizer() to your loss before manual_backward instead"
            )
        try:
            target = pl_module.get_submodule(self.module)
        except AttributeError as error:
            children = ", ".join(repr(name) for name, _ in pl_module.named_children()) or "none"
            raise ValueError(
                f"OrthogonalityCallback(module={self.module!r}): {type(pl_module).__name__} has no such submodule; "
                f"its children are {children}"
            ) from error
        self.regularizer = OrthogonalityRegularizer(target, self.kind, self.gamma, **self.regularizer_kwargs)
        if self._pending_state is not None:  # SRIP vectors of a checkpoint being resumed
            self.regularizer.load_state_dict(self._pending_state)
            self._pending_state = None
        original = pl_module.training_step

        @functools.wraps(original)  # keeps the signature Lightning inspects (batch_idx)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._add_term(pl_module, original(*args, **kwargs))

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _add_term(self, pl_module: LightningModule, output: Any) -> Any:
        """``output`` with the OR term added to its loss; ``None`` (a skipped batch) stays."""
        if output is None:
            return None
        assert self.regularizer is not None
        term = self.regularizer()
        pl_module.log(self.log_name, term.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        if isinstance(output, Tensor):
            return output + term
        if isinstance(output, dict) and "loss" in output:
            return {**output, "loss": output["loss"] + term}
        raise TypeError(
            f"OrthogonalityCallback: training_step returned {type(output).__name__}; it needs the loss, "
            f"a tensor or a dict with 'loss'"
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unwrap(pl_module)

    @staticmethod
    def _unwrap(pl_module: LightningModule) -> None:
        pl_module.__dict__.pop("training_step", None)  # the class's method again

    def state_dict(self) -> dict[str, Any]:
        """The regularizer's state (SRIP's power-iteration vectors; empty for SO)."""
        return dict(self.regularizer.state_dict()) if self.regularizer is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start builds the regularizer.
        if state_dict:
            self._pending_state = dict(state_dict)
