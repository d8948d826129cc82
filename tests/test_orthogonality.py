"""The orthogonality penalties and the regularizer, checked against exact float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from or_core import (
    DEFAULT_GAMMA,
    OrthogonalityRegularizer,
    dso_penalty,
    mc_penalty,
    regularized_weights,
    smaller_side_gram,
    so_penalty,
    srip_penalty,
)

# (out, in, *kernel): wide and tall, conv and linear.
SHAPES = [(16, 8, 3, 3), (64, 3, 3, 3), (24, 40), (40, 24), (12, 12), (8, 4, 5), (6, 2, 1, 2, 2)]


def _reference_gram(w: torch.Tensor) -> np.ndarray:
    """Smaller-side Gram minus I, in float64 numpy, straight from the definition."""
    m = w.detach().double().reshape(w.shape[0], -1).numpy()
    out, fan_in = m.shape
    return m @ m.T - np.eye(out) if out <= fan_in else m.T @ m - np.eye(fan_in)


def _reference(kind: str, w: torch.Tensor) -> float:
    g = _reference_gram(w)
    if kind == "so":
        return float((g**2).sum())
    if kind == "srip":
        return float(np.abs(np.linalg.eigvalsh(g)).max())
    if kind == "dso":
        m = w.detach().double().reshape(w.shape[0], -1).numpy()
        return float(((m @ m.T - np.eye(m.shape[0])) ** 2).sum() + ((m.T @ m - np.eye(m.shape[1])) ** 2).sum())
    # mc: largest |cosine| between two distinct vectors of the smaller side
    m = w.detach().double().reshape(w.shape[0], -1).numpy()
    vecs = m if m.shape[0] <= m.shape[1] else m.T
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    cos = vecs @ vecs.T
    np.fill_diagonal(cos, 0.0)
    return float(np.abs(cos).max())


def _orthogonal(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A weight whose matrix view has orthonormal rows (wide) or columns (tall)."""
    g = torch.Generator().manual_seed(seed)
    out, fan_in = shape[0], int(np.prod(shape[1:]))
    q, _ = torch.linalg.qr(torch.randn(max(out, fan_in), min(out, fan_in), generator=g, dtype=torch.float64))
    m = q if out > fan_in else q.t()
    return m.reshape(shape)


def _random(shape: tuple[int, ...], seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.3).to(dtype)


FUNCTIONAL = {"so": so_penalty, "dso": dso_penalty, "mc": mc_penalty, "srip": lambda w: srip_penalty(w, 500)}


@pytest.mark.parametrize("kind", ["so", "srip", "dso", "mc"])
@pytest.mark.parametrize("shape", SHAPES)
def test_penalty_equals_float64_reference(kind: str, shape: tuple[int, ...]) -> None:
    w = _random(shape, seed=len(shape) + shape[0])
    value = FUNCTIONAL[kind](w)
    assert value.dtype == torch.float32
    rel = 1e-2 if kind == "srip" else 1e-5
    assert value.item() == pytest.approx(_reference(kind, w), rel=rel, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_is_of_the_smaller_side(shape: tuple[int, ...]) -> None:
    w = _random(shape)
    n = min(shape[0], int(np.prod(shape[1:])))
    g = smaller_side_gram(w)
    assert g.shape == (n, n)
    np.testing.assert_allclose(g.double().numpy(), _reference_gram(w), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_penalties_vanish_on_orthogonal_weights(shape: tuple[int, ...]) -> None:
    w = _orthogonal(shape)
    assert so_penalty(w).item() == pytest.approx(0.0, abs=1e-20)
    assert srip_penalty(w, 5).item() == pytest.approx(0.0, abs=1e-12)
    assert mc_penalty(w).item() == pytest.approx(0.0, abs=1e-12)
    # DSO also penalizes the larger Gram, which has rank min(out, fan_in): zero only when square.
    out, fan_in = shape[0], int(np.prod(shape[1:]))
    assert dso_penalty(w).item() == pytest.approx(abs(out - fan_in), abs=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_so_gradient_is_closed_form(shape: tuple[int, ...]) -> None:
    w = _random(shape, dtype=torch.float64).requires_grad_()
    so_penalty(w).backward()
    m = w.detach().reshape(shape[0], -1)
    wide = m.shape[0] <= m.shape[1]
    g = torch.from_numpy(_reference_gram(w))
    expected = 4 * g @ m if wide else 4 * m @ g
    torch.testing.assert_close(w.grad.reshape(m.shape), expected)


def _conv_resnet18() -> nn.Module:
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def _small_vit() -> nn.Module:
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    vit.heads = nn.Identity()
    return vit


@pytest.mark.parametrize("kind", ["so", "dso", "mc", "srip"])
def test_regularizer_equals_sum_of_references_with_gradients(kind: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3),
        nn.Conv2d(8, 64, 1), nn.Linear(64, 16), nn.Linear(16, 64), nn.Linear(16, 64)
    ).double()
    reg = OrthogonalityRegularizer(net, kind, gamma=0.5, n_power_iterations=1000)
    value = reg()
    weights = [w for _, w in regularized_weights(net)]
    expected = 0.5 * sum(_reference(kind, w) for w in weights)
    assert value.item() == pytest.approx(expected, rel=1e-8 if kind != "srip" else 1e-6)
    grads = torch.autograd.grad(value, weights)
    exact = {**FUNCTIONAL, "srip": lambda w: torch.linalg.matrix_norm(smaller_side_gram(w), 2)}
    reference_value = 0.5 * sum(exact[kind](w) for w in weights)
    reference_grads = torch.autograd.grad(reference_value, weights)
    for grad, ref in zip(grads, reference_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-8)


def test_fast_so_passes_gradcheck() -> None:
    from or_core.orthogonality import _SoftOrthogonality

    g = torch.Generator().manual_seed(0)
    mats = (
        torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(_SoftOrthogonality.apply, mats)
    conv = torch.randn(6, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(so_penalty, (conv,))


def test_fast_srip_passes_gradcheck() -> None:
    """The closed-form SRIP gradient ``u w^T + v (M^T u)^T`` equals finite differences of
    ``sum_l ||(M_l M_l^T - I) v_l||`` (fixed ``v_l``), a square matrix included."""
    import torch.nn.functional as F

    from or_core.orthogonality import _SpectralRestrictedIsometry

    g = torch.Generator().manual_seed(3)
    mats = (
        torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True),
    )
    vectors = [F.normalize(torch.randn(m.shape[0], generator=g, dtype=torch.float64), dim=0) for m in mats]
    assert torch.autograd.gradcheck(lambda *m: _SpectralRestrictedIsometry.apply(2, *m, *vectors), mats)


def test_srip_persistent_vectors_converge_to_the_spectral_norm() -> None:
    """One power iteration per call, vectors kept: a random ResNet-18's near-degenerate top
    eigenvalues make this the slow case (measured: 4% off after 100 calls, 0.8% after 200)."""
    torch.manual_seed(1)
    STEPS = 300
    net = _conv_resnet18()
    reg = OrthogonalityRegularizer(net, "srip", gamma=1.0, n_power_iterations=1)
    with torch.no_grad():
        for _ in range(STEPS):
            reg.penalty()
    estimate = reg.per_layer()
    for name, w in regularized_weights(net):
        exact = torch.linalg.matrix_norm(smaller_side_gram(w.detach()), 2).item()
        assert estimate[name].item() == pytest.approx(exact, rel=1e-2), name


def test_srip_functional_with_enough_iterations_matches_matrix_norm() -> None:
    w = _random((64, 32, 3, 3), seed=3)
    exact = torch.linalg.matrix_norm(smaller_side_gram(w), 2).item()
    assert srip_penalty(w, n_power_iterations=200).item() == pytest.approx(exact, rel=1e-2)


@pytest.mark.parametrize("columns", [8, 5])
def test_proposition_1_orthogonal_layer_keeps_whitened_input_white(columns: int) -> None:
    """He et al., Prop. 1: X whitened (mean 0, cov s^2 I) and W orthogonal => S = X W is too."""
    g = torch.Generator().manual_seed(0)
    d, n, s = 8, 2000, 1.7
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    eigval, eigvec = torch.linalg.eigh(torch.cov(x.T))
    x = s * x @ eigvec @ torch.diag(eigval.rsqrt()) @ eigvec.T  # exact ZCA whitening
    w = _orthogonal((columns, d), seed=1).T  # (d, columns), orthonormal columns
    out = x @ w
    torch.testing.assert_close(out.mean(0), torch.zeros(columns, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), s**2 * torch.eye(columns, dtype=torch.float64))
    # and a non-orthogonal W does not keep it white
    bad = torch.cov((x @ (w * torch.linspace(0.5, 1.5, columns, dtype=torch.float64))).T)
    assert not torch.allclose(bad, s**2 * torch.eye(columns, dtype=torch.float64), atol=1e-2)


def test_selects_exactly_the_20_convs_of_a_cifar_resnet18() -> None:
    net = _conv_resnet18()
    names = [n for n, _ in regularized_weights(net)]
    expected = ["conv1.weight"] + [
        f"layer{stage}.{block}.conv{i}.weight" for stage in range(1, 5) for block in range(2) for i in (1, 2)
    ] + [f"layer{stage}.0.downsample.0.weight" for stage in (2, 3, 4)]
    assert sorted(names) == sorted(expected)
    assert len(names) == 20
    net.fc = nn.Linear(512, 10)
    assert len(regularized_weights(net)) == 21
    assert len(OrthogonalityRegularizer(net).names) == 21


def test_selects_the_weights_of_a_vit() -> None:
    vit = _small_vit()
    names = [n for n, _ in regularized_weights(vit)]
    per_block = ["self_attention.in_proj_weight", "self_attention.out_proj.weight", "mlp.0.weight", "mlp.3.weight"]
    expected = ["conv_proj.weight"] + [
        f"encoder.layers.encoder_layer_{i}.{p}" for i in range(2) for p in per_block
    ]
    assert sorted(names) == sorted(expected)
    assert not any("bias" in n or "ln" in n or "pos_embedding" in n or "class_token" in n for n in names)
    reg = OrthogonalityRegularizer(vit, "srip")
    reg().backward()
    assert vit.encoder.layers[0].self_attention.in_proj_weight.grad is not None


def test_include_and_exclude_filters() -> None:
    net = _conv_resnet18()
    only_layer4 = regularized_weights(net, include=r"^layer4\.")
    assert len(only_layer4) == 5 and all(n.startswith("layer4.") for n, _ in only_layer4)
    no_downsample = regularized_weights(net, exclude="downsample")
    assert len(no_downsample) == 17
    with pytest.raises(ValueError, match="include/exclude"):
        OrthogonalityRegularizer(net, include="no-such-layer")


def test_gradient_descent_on_so_alone_orthogonalizes_a_conv_weight() -> None:
    STEPS = 400
    for shape in [(16, 8, 3, 3), (64, 3, 3, 3)]:
        conv = nn.Conv2d(shape[1], shape[0], shape[2], bias=False)
        reg = OrthogonalityRegularizer(conv, "so", gamma=1.0)
        start = reg().item()
        opt = torch.optim.SGD(conv.parameters(), lr=0.05)
        for _ in range(STEPS):
            opt.zero_grad()
            reg().backward()
            opt.step()
        assert start > 1.0 and reg().item() < 1e-8
        s = torch.linalg.svdvals(conv.weight.detach().reshape(shape[0], -1))
        n = min(shape[0], int(np.prod(shape[1:])))
        torch.testing.assert_close(s[:n], torch.ones(n), atol=1e-4, rtol=0)


def test_srip_vectors_survive_a_state_dict_round_trip() -> None:
    net = _conv_resnet18()
    reg = OrthogonalityRegularizer(net, "srip")
    for _ in range(3):
        reg()
    state = reg.state_dict()
    assert len(state) == 20 and all(k.startswith("srip_v__") for k in state)
    fresh = OrthogonalityRegularizer(net, "srip")
    assert not all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
    fresh.load_state_dict(state)
    assert fresh().item() == reg().item()
    assert OrthogonalityRegularizer(net, "so").state_dict() == {}


@pytest.mark.parametrize("kind", ["so", "srip"])
def test_math_runs_in_float32_under_autocast(kind: str) -> None:
    net = _conv_resnet18()
    reg = OrthogonalityRegularizer(net, kind, gamma=1.0, n_power_iterations=1)
    state = {k: v.clone() for k, v in reg.state_dict().items()}
    plain = reg()
    reg.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = reg()
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(plain.item(), rel=1e-5)


def test_defaults_come_from_the_paper_grids() -> None:
    net = nn.Linear(4, 4)
    assert OrthogonalityRegularizer(net).gamma == 1e-6 == DEFAULT_GAMMA["so"]
    assert OrthogonalityRegularizer(net, "srip").gamma == 1e-3
    assert OrthogonalityRegularizer(net, "so", gamma=1e-5).gamma == 1e-5


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="so, srip, dso, mc"):
        OrthogonalityRegularizer(nn.Linear(3, 3), "frobenius")
    with pytest.raises(ValueError, match="1-D tensor"):
        so_penalty(torch.ones(5))
    with pytest.raises(ValueError, match="no weight to regularize"):
        OrthogonalityRegularizer(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()))
    with pytest.raises(ValueError, match="n_power_iterations"):
        OrthogonalityRegularizer(nn.Linear(3, 3), "srip", n_power_iterations=0)


def test_regularizer_does_not_own_the_encoder_parameters() -> None:
    net = _conv_resnet18()
    reg = OrthogonalityRegularizer(net)
    assert list(reg.parameters()) == []
    holder = nn.Module()
    holder.backbone, holder.regularizer = net, reg
    assert len(list(holder.parameters())) == len(list(net.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["so", "srip"])
def test_cuda_matches_cpu(kind: str) -> None:
    """Same weights and (for SRIP) the same starting power-iteration vectors: the CUDA value, under
    bf16 autocast, equals the CPU one. (With vectors drawn apart, 50 iterations on a ResNet-18's
    Grams, whose top eigenvalues lie close, once differed by 0.36% on an H200.)"""
    net = _conv_resnet18()
    cpu_reg = OrthogonalityRegularizer(net, kind, gamma=1.0, n_power_iterations=50)
    start = {k: v.clone() for k, v in cpu_reg.state_dict().items()}
    cpu = cpu_reg().item()
    net = net.cuda()
    reg = OrthogonalityRegularizer(net, kind, gamma=1.0, n_power_iterations=50).cuda()
    reg.load_state_dict(start)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = reg()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(cpu, rel=1e-3)


def test_srip_keeps_its_vector_where_g_v_vanishes() -> None:
    """An exactly orthogonal weight has ``G v = 0``: its vector stays as it was (no 0/0), while
    another layer's vector moves, and the penalty of the orthogonal layer is 0."""
    eye, other = nn.Linear(4, 4, bias=False), nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(4))
    reg = OrthogonalityRegularizer(nn.Sequential(eye, other), "srip", gamma=1.0, n_power_iterations=3)
    before = {k: v.clone() for k, v in reg.state_dict().items()}
    value = reg()
    after = reg.state_dict()
    assert torch.equal(after["srip_v__0__weight"], before["srip_v__0__weight"])
    assert not torch.equal(after["srip_v__1__weight"], before["srip_v__1__weight"])
    assert torch.isfinite(after["srip_v__1__weight"]).all()
    assert value.item() == pytest.approx(reg.per_layer()["1.weight"].item(), rel=1e-6)
