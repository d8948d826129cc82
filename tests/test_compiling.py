"""torch.compile of the encoders (or_core.fast_path.compiled_calls): which modules, the setting, eager evaluation.

Compilation here uses dynamo's ``eager`` backend (graph capture without code generation), so
the tests take seconds on a CPU; the inductor modes are timed on CUDA by
``benchmarks/train_throughput.py --compile ...``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from or_core.backbones import build_backbone
from or_core.config import resolve_config
from or_core.evaluate import extract_features
from or_core.fast_path.compiled_calls import (
    COMPILE_MODES,
    compile_encoders,
    compile_mode,
    compile_regularizer,
    eager,
)
from or_core.methods import build_method
from or_core.orthogonality import OrthogonalityRegularizer


def _method(name: str) -> nn.Module:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", image_size=32, width=0.125)
    return build_method(name, backbone, dim, proj_hidden_dim=64, proj_output_dim=32)


def test_compile_setting_values():
    assert [compile_mode(v) for v in (False, None, "none", True)] == [None, None, None, "default"]
    for mode in COMPILE_MODES:
        assert compile_mode(mode) == mode
    with pytest.raises(ValueError, match="unknown compile setting 'fast'.*reduce-overhead"):
        compile_mode("fast")


def test_a_bad_compile_setting_stops_the_run_before_any_data_is_read(tmp_path):
    from or_core.training_run import build_run

    with pytest.raises(ValueError, match="field 'compile' must be true, false or one of none, default"):
        resolve_config("ci", overrides={"compile": "fastest", "data_root": str(tmp_path / "missing")})
    cfg = resolve_config("ci", overrides={"data_root": str(tmp_path / "missing")})
    cfg.compile = "fastest"  # set after the checks: build_run still refuses it before reading data
    with pytest.raises(ValueError, match="unknown compile setting 'fastest'"):
        build_run(cfg)


@pytest.mark.parametrize(("name", "n_compiled"), [("byol", 2), ("mocov2", 2), ("simclr", 1)])
def test_the_backbone_and_its_ema_copies_are_compiled_and_heads_are_not(name, n_compiled):
    method = _method(name)
    keys = list(method.state_dict())
    compiled = compile_encoders(method, "default", backend="eager")
    assert compiled[0] is method.backbone and len(compiled) == n_compiled
    is_compiled = {id(m) for m in compiled}
    for module in method.modules():
        assert (module.__dict__.get("_compiled_call_impl") is not None) == (id(module) in is_compiled)
    assert list(method.state_dict()) == keys  # checkpoints stay interchangeable


def test_compiled_training_loss_equals_eager_and_evaluation_runs_eagerly():
    torch.manual_seed(1)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    reference = _method("byol")
    method = _method("byol")
    compile_encoders(method, "default", backend="eager")
    torch._dynamo.reset()
    expected = reference.training_loss(views, 0.3)["loss"]
    got = method.training_loss(views, 0.3)["loss"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    calls = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args):
            calls.append(1)
            return graph.forward(*args)

        return run

    torch._dynamo.reset()
    compile_encoders(method, "default", backend=counting_backend)
    method.backbone(torch.zeros(2, 3, 32, 32))
    assert calls, "the compiled backbone did not run its compiled graph"
    calls.clear()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    features = extract_features(method.backbone, images, (0.5,) * 3, (0.25,) * 3)
    assert calls == [] and features.shape == (5, 64)
    with eager():
        method.backbone(torch.zeros(2, 3, 32, 32))
    assert calls == []
    method.backbone(torch.zeros(2, 3, 32, 32))
    assert calls  # the compiled call is back after evaluation


@pytest.mark.parametrize("kind", ["so", "srip", "so_diag", "so_offdiag"])
def test_a_compiled_or_term_equals_the_eager_one_in_value_gradient_and_srip_vectors(kind):
    """``aot_eager`` traces the forward and the closed-form backward into graphs (what inductor
    then compiles) and runs them without code generation: the same float32 operations, so the
    value and every gradient agree to rounding, and SRIP's power-iteration vectors move alike."""
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", image_size=32, width=0.125)
    reference = OrthogonalityRegularizer(backbone, kind, gamma=1e-3)
    compiled = OrthogonalityRegularizer(backbone, kind, gamma=1e-3)
    compiled.load_state_dict(reference.state_dict())
    holder = nn.Module()
    holder.regularizer = compiled
    torch._dynamo.reset()
    assert compile_regularizer(holder, "default", backend="aot_eager") is compiled
    assert compiled.__dict__.get("_compiled_call_impl") is not None
    for _ in range(2):  # the second call starts from the vectors the first one left
        results = []
        for term in (reference, compiled):
            backbone.zero_grad(set_to_none=True)
            value = term()
            value.backward()
            results.append((value.detach(), [p.grad.clone() for p in backbone.parameters() if p.grad is not None]))
        (value, grads), (value_c, grads_c) = results
        torch.testing.assert_close(value_c, value, rtol=1e-5, atol=0.0)
        assert len(grads) == len(grads_c) == len(reference.names)
        for g, g_c in zip(grads, grads_c):
            torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-9)
    assert list(compiled.state_dict()) == list(reference.state_dict())
    for a, b in zip(reference.buffers(), compiled.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert compile_regularizer(nn.Module(), "default") is None  # a method without OR: nothing to compile


def test_compile_or_compiles_the_run_s_or_term_only_with_compile(cifar10_dir):
    from or_core.training_run import build_run

    base = {"data_root": str(cifar10_dir.parent), "subset": 256, "regularizer": "so"}
    with_or = build_run(resolve_config("ci", overrides={**base, "compile": "default", "compile_or": True}))
    assert with_or.method.regularizer.__dict__.get("_compiled_call_impl") is not None
    without = build_run(resolve_config("ci", overrides={**base, "compile": "default"}))
    assert without.method.regularizer.__dict__.get("_compiled_call_impl") is None
    eager_run = build_run(resolve_config("ci", overrides={**base, "compile_or": True}))  # no compile: no effect
    assert eager_run.method.regularizer.__dict__.get("_compiled_call_impl") is None
