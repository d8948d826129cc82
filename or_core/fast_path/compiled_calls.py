"""Compiled calls: ``torch.compile`` of a method's encoders for training, eager calls for
evaluation.

Why: a training step at batch 256 on one GPU waits on the host issuing a few thousand small
kernel launches; compiling the backbone fuses its element-wise work, and the ``reduce-overhead``
mode replays each compiled call as one CUDA graph (measurements:
results/benchmarks/NOTES.md#compiled-gpu-step). The online backbone is compiled, and so are its
EMA copies (BYOL's, MoCo's and DINO's target backbones), which run a forward of the same shapes
every step.

Evaluation (kNN, linear probe, collapse diagnostics) runs the same modules in eval mode on
batches of other sizes; :func:`eager` runs them uncompiled there, so that evaluation never
recompiles, records graphs of every batch size, or differs from a run that was not compiled.
Multi-process (DDP) runs are not compiled (:func:`or_core.training_run.build_run` warns), as
that combination is untested.

Only public APIs: ``nn.Module.compile``, ``torch.compiler.set_stance`` and
``torch.compiler.cudagraph_mark_step_begin``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "compile_encoders", "compile_mode", "compile_regularizer", "eager", "mark_step_begin"]

#: ``torch.compile`` modes accepted by the ``compile`` setting (``True`` means ``"default"``).
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: bool | str | None) -> str | None:
    """The ``torch.compile`` mode of a ``compile`` setting, or ``None`` for no compilation.

    ``False``/``None``/``"none"``: not compiled; ``True``: ``"default"``; else one of
    :data:`COMPILE_MODES`, anything else a ``ValueError`` that lists them.
    """
    if value is None or value is False or value == "none":
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"unknown compile setting {value!r}; valid: false, true, {', '.join(COMPILE_MODES)}")


def compile_encoders(method: nn.Module, mode: str, **compile_kwargs) -> list[nn.Module]:
    """Compile ``method.backbone`` and its EMA copies in place (``nn.Module.compile``).

    The modules keep their names, parameters and ``state_dict`` keys, so checkpoints of compiled
    and eager runs are interchangeable. Returns the compiled modules.
    """
    compile_mode(mode)  # validates
    encoders = [method.backbone]
    pairs = method.momentum_pairs() if hasattr(method, "momentum_pairs") else []
    encoders += [target for online, target in pairs if online is method.backbone]
    for module in encoders:
        module.compile(mode=mode, **compile_kwargs)
    return encoders


def compile_regularizer(method: nn.Module, mode: str, **compile_kwargs) -> nn.Module | None:
    """Compile ``method.regularizer``, the OR term, in place; ``None`` when the method has none.

    Eager, the term is a few kernels per regularized layer, launched one by one beside the
    compiled backbone; compiled, its forward and backward are one graph each (under
    ``reduce-overhead`` a CUDA graph). Its ``state_dict`` (SRIP's vectors) keeps its keys.
    """
    compile_mode(mode)  # validates
    regularizer = getattr(method, "regularizer", None)
    if regularizer is None:
        return None
    regularizer.compile(mode=mode, **compile_kwargs)
    return regularizer


def eager() -> contextlib.AbstractContextManager[None]:
    """Within the block, every compiled call (``nn.Module.compile``, ``torch.compile``) runs
    eagerly: neither compiled nor recompiled, and no CUDA graph recorded or replayed."""
    return torch.compiler.set_stance("force_eager")


def mark_step_begin(compiled: str | None) -> None:
    """Start a training step of a run whose encoders were compiled in ``compiled`` mode
    (``None``: not compiled, nothing to do): for CUDA graph trees a new iteration begins, so the
    outputs of the last step's graphs may be overwritten."""
    if compiled is not None:
        torch.compiler.cudagraph_mark_step_begin()
