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
    so_diag_penalty,
    so_offdiag_penalty,
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
    if kind == "so_diag":
        return float((np.diag(g) ** 2).sum())
    if kind == "so_offdiag":
        return float(((g - np.diag(np.diag(g))) ** 2).sum())
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


FUNCTIONAL = {
    "so": so_penalty,
    "dso": dso_penalty,
    "mc": mc_penalty,
    "srip": lambda w: srip_penalty(w, 500),
    "so_diag": so_diag_penalty,
    "so_offdiag": so_offdiag_penalty,
}
ALL_KINDS = ["so", "srip", "dso", "mc", "so_diag", "so_offdiag"]


@pytest.mark.parametrize("kind", ALL_KINDS)
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


@pytest.mark.parametrize("kind", ["so", "dso", "mc", "srip", "so_diag", "so_offdiag"])
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


@pytest.mark.parametrize("kind", ["so", "srip", "so_diag", "so_offdiag"])
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
    # SO's parts run at SO's strength (and on SO's grid {1e-5, 1e-6, 1e-7})
    assert OrthogonalityRegularizer(net, "so_diag").gamma == 1e-6 == DEFAULT_GAMMA["so_diag"]
    assert OrthogonalityRegularizer(net, "so_offdiag").gamma == 1e-6 == DEFAULT_GAMMA["so_offdiag"]


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
@pytest.mark.parametrize("kind", ["so", "srip", "so_diag", "so_offdiag"])
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


# ----------------------------------------------------------------------------------------------
# SO's two parts: so_diag (norms only) + so_offdiag (decorrelation only) = so
# ----------------------------------------------------------------------------------------------
def _wide(w: torch.Tensor) -> torch.Tensor:
    """The matrix view, transposed if tall: its rows are the vectors SO's parts act on."""
    m = w.detach().reshape(w.shape[0], -1)
    return m if m.shape[0] <= m.shape[1] else m.t()


def _as_weight(wide: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A weight of ``shape`` whose wide view is ``wide`` (``(n, m)``, ``n <= m``)."""
    tall = shape[0] > int(np.prod(shape[1:]))
    return (wide.t() if tall else wide).reshape(shape).contiguous()


@pytest.mark.parametrize("c", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_so_parts_of_scaled_orthonormal_rows(shape: tuple[int, ...], c: float) -> None:
    """``c Q`` with orthonormal rows (or columns): ``G = (c^2 - 1) I``, so the diagonal part is
    ``n (c^2 - 1)^2`` and the off-diagonal part 0, for the functions and the regularizer."""
    w = c * _orthogonal(shape, seed=shape[0])
    n = min(shape[0], int(np.prod(shape[1:])))
    expected = n * (c**2 - 1) ** 2
    linear = nn.Linear(1, 1, bias=False).double()
    linear.weight = nn.Parameter(w.reshape(shape[0], -1).clone())
    fast = {k: OrthogonalityRegularizer(linear, k, gamma=1.0)().item() for k in ("so_diag", "so_offdiag")}
    functional = (so_diag_penalty(w).item(), so_offdiag_penalty(w).item())
    for diag, off in [functional, (fast["so_diag"], fast["so_offdiag"])]:
        # Householder QR leaves |Q Q^T - I| entries of a few float64 eps (~1e-15): the diagonal
        # part is off by about 2 n |c^2 - 1| c^2 * 1e-15 at most (1e-12 absolute covers n = 64,
        # c = 3), the off-diagonal part is a sum of n^2 squares of ~c^2 * 1e-15, below 1e-24.
        assert diag == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert 0.0 <= off < 1e-24


@pytest.mark.parametrize("shape", [(4, 9), (9, 4), (4, 3, 1, 3), (6, 1, 2, 2)])
def test_so_parts_of_equal_norm_equicorrelated_rows(shape: tuple[int, ...]) -> None:
    """Rows ``m_i = r (sqrt(1 - rho) q_i + sqrt(rho) q_0)`` with orthonormal ``q_0 .. q_n`` have
    ``||m_i||^2 = r^2`` and ``<m_i, m_j> = r^2 rho``: diagonal part ``n (r^2 - 1)^2``,
    off-diagonal part ``n (n - 1) r^4 rho^2``, SO their sum and MC ``rho``."""
    n, m = min(shape[0], int(np.prod(shape[1:]))), max(shape[0], int(np.prod(shape[1:])))
    r2, rho = 2.0, 0.25
    q = _orthogonal((n + 1, m), seed=7)  # n + 1 orthonormal rows (m >= n + 1 for every shape here)
    wide = np.sqrt(r2) * (np.sqrt(1 - rho) * q[1:] + np.sqrt(rho) * q[:1])
    w = _as_weight(wide, shape)
    diag, off = n * (r2 - 1) ** 2, n * (n - 1) * r2**2 * rho**2
    # Every quantity is a few float64 roundings of O(1) numbers summed over n^2 <= 36 entries:
    # relative errors of order 1e-15, 1e-12 leaves a wide margin.
    assert so_diag_penalty(w).item() == pytest.approx(diag, rel=1e-12)
    assert so_offdiag_penalty(w).item() == pytest.approx(off, rel=1e-12)
    assert so_penalty(w).item() == pytest.approx(diag + off, rel=1e-12)
    assert mc_penalty(w).item() == pytest.approx(rho, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES + [(128, 64, 3, 3), (64, 512)])
def test_so_is_exactly_diag_plus_offdiag(shape: tuple[int, ...]) -> None:
    """Random float64 conv and linear weights, wide and tall: ``SO = diag + offdiag`` for the
    functions and for the regularizer's fast paths. All three are sums of squares (no
    cancellation) of Gram entries with relative error ``~ fan * eps <= 600 * 1.1e-16 ~ 7e-14``;
    1e-12 relative bounds the difference."""
    w = _random(shape, seed=shape[0] + len(shape), dtype=torch.float64)
    so, diag, off = so_penalty(w).item(), so_diag_penalty(w).item(), so_offdiag_penalty(w).item()
    assert diag > 0 and off > 0
    assert diag + off == pytest.approx(so, rel=1e-12)
    layer = nn.Linear(1, 1, bias=False).double()
    layer.weight = nn.Parameter(w.reshape(shape[0], -1).clone())
    fast = {k: OrthogonalityRegularizer(layer, k, gamma=1.0)().item() for k in ("so", "so_diag", "so_offdiag")}
    assert fast["so_diag"] + fast["so_offdiag"] == pytest.approx(fast["so"], rel=1e-12)
    assert fast["so_diag"] == pytest.approx(diag, rel=1e-12)
    assert fast["so_offdiag"] == pytest.approx(off, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_so_parts_gradients_are_closed_form(shape: tuple[int, ...]) -> None:
    """Autograd through the functions gives ``4 diag(G) M`` and ``4 (G - diag(G)) M`` on the wide
    view ``M`` (``4 W D`` and ``4 W (G - D)`` for a tall ``W``), summing to SO's ``4 G M``.
    float64, the same products in another order: assert_close's float64 default (rtol 1e-7)."""
    m = _random(shape, seed=shape[0], dtype=torch.float64).reshape(shape[0], -1)
    wide = m.shape[0] <= m.shape[1]
    g = torch.from_numpy(_reference_gram(m))
    d = torch.diag(torch.diagonal(g))
    grads = {}
    for name, fn, part in [("diag", so_diag_penalty, d), ("off", so_offdiag_penalty, g - d)]:
        w = m.reshape(shape).clone().requires_grad_()
        fn(w).backward()
        grads[name] = w.grad.reshape(m.shape)
        torch.testing.assert_close(grads[name], 4 * part @ m if wide else 4 * m @ part)
    torch.testing.assert_close(grads["diag"] + grads["off"], 4 * g @ m if wide else 4 * m @ g)


def test_fast_so_parts_pass_gradcheck() -> None:
    """The closed-form backward of both parts equals finite differences (a wide and a square
    matrix, float64), and through the regularizer equals autograd through the functions on
    wide and tall conv and linear weights."""
    from or_core.orthogonality import _DiagonalSoftOrthogonality, _OffDiagonalSoftOrthogonality

    g = torch.Generator().manual_seed(5)
    mats = (
        torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(_DiagonalSoftOrthogonality.apply, mats)
    assert torch.autograd.gradcheck(_OffDiagonalSoftOrthogonality.apply, mats)
    net = nn.Sequential(nn.Conv2d(2, 6, 2), nn.Conv2d(6, 40, 1), nn.Linear(5, 3), nn.Linear(3, 7)).double()
    weights = [w for _, w in regularized_weights(net)]
    for kind in ("so_diag", "so_offdiag"):
        reg = OrthogonalityRegularizer(net, kind, gamma=1.0)
        assert torch.autograd.gradcheck(lambda *ws: reg(), weights)  # through the encoder's own weights
        fast = torch.autograd.grad(reg(), weights)
        plain = torch.autograd.grad(sum(FUNCTIONAL[kind](w) for w in weights), weights)
        for a, b in zip(fast, plain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["so", "so_diag", "so_offdiag"])
def test_so_parts_on_a_real_encoder_equal_the_sum_of_functional_penalties(kind: str) -> None:
    """``build_backbone("resnet18", width=0.125)``: value and gradients of the regularizer are
    the sum of the functional penalties over :func:`regularized_weights`. float64: the same
    arithmetic reduced in another order (per layer, then foreach), so 1e-10 relative; float32
    (the training dtype): 20 layers of up to 64 x 576 entries, rounding ~1e-6 relative."""
    from or_core.backbones import build_backbone

    torch.manual_seed(0)
    encoder, _ = build_backbone("resnet18", image_size=32, width=0.125)
    reg = OrthogonalityRegularizer(encoder, kind, gamma=1e-6)
    weights = [w for _, w in regularized_weights(encoder)]
    assert len(weights) == 20
    value32 = reg().item()
    assert value32 == pytest.approx(1e-6 * sum(FUNCTIONAL[kind](w).item() for w in weights), rel=1e-5)
    encoder.double()
    value = reg()
    assert value.dtype == torch.float64
    expected = 1e-6 * sum(FUNCTIONAL[kind](w) for w in weights)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    for fast, plain in zip(torch.autograd.grad(value, weights), torch.autograd.grad(expected, weights)):
        torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-18)
    layer_sum = sum(v.item() for v in reg.per_layer().values())
    assert 1e-6 * layer_sum == pytest.approx(value.item(), rel=1e-10)


def _rows_of_spread_norms(layer: nn.Module, seed: int) -> None:
    """Give ``layer.weight`` a wide view with random directions and row norms from 0.5 to 1.8."""
    w = layer.weight
    n, m = sorted((w.shape[0], w[0].numel()))
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n, m, generator=g), dim=1)
    wide = torch.linspace(0.5, 1.8, n).unsqueeze(1) * directions
    with torch.no_grad():
        w.copy_(_as_weight(wide, tuple(w.shape)))


#: A wide conv (16 x 72 view) and a tall linear layer (32 x 8, whose wide view is W^T).
DESCENT_LAYERS = {
    "wide-conv": lambda: nn.Conv2d(8, 16, 3, bias=False),
    "tall-linear": lambda: nn.Linear(8, 32, bias=False),
}


def _cosines(w: torch.Tensor) -> torch.Tensor:
    u = torch.nn.functional.normalize(_wide(w), dim=1)
    return u @ u.t()


@pytest.mark.parametrize("layer_name", DESCENT_LAYERS)
def test_descent_on_so_diag_alone_fixes_norms_not_angles(layer_name: str) -> None:
    """The diagonal part's gradient ``4 (||m_i||^2 - 1) m_i`` is parallel to each row: SGD only
    rescales the rows, to unit norm, and keeps every angle between them, so the off-diagonal part
    ends at ``sum_{i != j} cos_ij^2 > 0``. (Measured: diag 17.6 -> 2e-13 in 400 steps.)"""
    layer = DESCENT_LAYERS[layer_name]()
    _rows_of_spread_norms(layer, seed=1)
    w = layer.weight
    reg = OrthogonalityRegularizer(layer, "so_diag", gamma=1.0)
    cos_before, off_before = _cosines(w), so_offdiag_penalty(w).item()
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        reg().backward()
        opt.step()
    assert reg().item() < 1e-10
    norms = torch.linalg.vector_norm(_wide(w), dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)
    # Rescaling a row by a positive factor keeps its cosines; float32 rounding over 400 steps
    # moves them by ~1e-7.
    torch.testing.assert_close(_cosines(w), cos_before, atol=1e-5, rtol=0)
    off_after = so_offdiag_penalty(w).item()
    expected_off = (cos_before - torch.diag(torch.diagonal(cos_before))).pow(2).sum().item()
    assert off_after == pytest.approx(expected_off, rel=1e-4)
    assert off_after > 0.5 and off_after != pytest.approx(off_before, rel=1e-2)


@pytest.mark.parametrize("layer_name", DESCENT_LAYERS)
def test_descent_on_so_offdiag_alone_decorrelates_without_fixing_norms(layer_name: str) -> None:
    """The off-diagonal part alone drives every ``<m_i, m_j>`` (i != j) to 0 (MC, the largest
    |cosine|, to ~0) but leaves the norms spread around 1, the diagonal part far from 0.
    (Measured: offdiag 10.0 -> 4e-15 in 400 steps, norms 0.46 .. 1.65.)"""
    layer = DESCENT_LAYERS[layer_name]()
    _rows_of_spread_norms(layer, seed=2)
    w = layer.weight
    reg = OrthogonalityRegularizer(layer, "so_offdiag", gamma=1.0)
    assert mc_penalty(w).item() > 0.3
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        reg().backward()
        opt.step()
    assert reg().item() < 1e-10
    assert mc_penalty(w).item() < 1e-5
    norms = torch.linalg.vector_norm(_wide(w), dim=1)
    assert norms.min().item() < 0.6 and norms.max().item() > 1.5
    assert so_diag_penalty(w).item() > 1.0


def test_so_parts_reach_the_command_line_and_the_config() -> None:
    """The new kinds are values of ``--regularizer`` (from PENALTY_KINDS via REGULARIZERS), are
    accepted by the config with SO's gamma, and build a method's regularizer."""
    import contextlib
    import io

    from or_core import PENALTY_KINDS
    from or_core.__main__ import _parser
    from or_core.backbones import build_backbone
    from or_core.config import resolve_config
    from or_core.methods import REGULARIZERS, build_method

    assert {"so_diag", "so_offdiag"} <= set(PENALTY_KINDS) <= set(REGULARIZERS)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        _parser().parse_args(["pretrain", "--help"])
    assert "so_diag" in out.getvalue() and "so_offdiag" in out.getvalue()
    args = _parser().parse_args(["pretrain", "--regularizer", "so_offdiag", "--out", "x"])
    assert args.regularizer == "so_offdiag"
    cfg = resolve_config("ci", overrides={"regularizer": "so_diag", "gamma": 1e-6})
    assert (cfg.regularizer, cfg.gamma) == ("so_diag", 1e-6)
    backbone, dim = build_backbone("resnet18", image_size=32, width=0.125)
    method = build_method("byol", backbone, dim, regularizer="so_offdiag")
    assert method.regularizer is not None and method.regularizer.kind == "so_offdiag"
    assert method.regularizer.gamma == 1e-6
