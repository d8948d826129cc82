"""``torch.compile`` of a method's encoders for training, and eager calls for evaluation.

A training step at batch 256 on one GPU waits on the host issuing a few thousand small kernel
launches (``benchmarks/step_profile.py``). Compiling the backbone fuses its element-wise work;
the ``reduce-overhead`` mode also replays each compiled call as one CUDA graph, which removes
most of those launches. The online backbone is compiled, and so are its EMA copies (BYOL's,
MoCo's and DINO's target backbones), which run a forward of the same shapes every step.

Evaluation (kNN, linear probe, collapse diagnostics) runs the same modules in eval mode on
batches of other sizes; :func:`eager` runs them uncompiled there, so that evaluation never
recompiles, records graphs of every batch size, or differs from a run that was not compiled.

With ``reduce-overhead`` a BYOL + SO step at batch 256 runs roughly twice as fast as eager,
with the same losses to bf16 precision (measurements:
results/benchmarks/NOTES.md#compiled-gpu-step). Multi-process (DDP) runs are not compiled
(:func:`or_core.training_run.build_run` warns), as that combination is untested.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["COMPILE_MODES", "compile_encoders", "compile_mode", "eager"]

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


@contextlib.contextmanager
def eager(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, calls of ``module`` (compiled by ``nn.Module.compile``) run eagerly."""
    compiled = module.__dict__.get("_compiled_call_impl")
    if compiled is None:
        yield module
        return
    module._compiled_call_impl = None
    try:
        yield module
    finally:
        module._compiled_call_impl = compiled
