"""Tests of or_core.diagnostics: spectra of weights and features, effective rank, RankMe."""

from __future__ import annotations

import lightly.utils.debug
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from or_core import diagnostics
from or_core.diagnostics import (
    covariance_eigenvalues,
    effective_rank,
    feature_spectra,
    features,
    normalized_spectrum,
    orthogonality_error,
    rankme,
    std_of_l2_normalized,
    weight_spectra,
)
from or_core.orthogonality import regularized_weights, so_penalty

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def _orthonormal_rows(k: int, d: int, seed: int = 0) -> torch.Tensor:
    """A (k, d) float64 matrix with orthonormal rows, k <= d."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64, generator=g))
    return q.t()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Run this file single-threaded: its matrices are small, and on a busy 2-core machine
    two OpenMP threads made the SVDs 5-10x slower. The previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    return model


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _resnet18()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _np_effective_rank(x: np.ndarray) -> float:
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _np_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / np.abs(s).sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# ----------------------------------------------------------------------------------------------
# Effective rank and RankMe
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7, 16])
def test_effective_rank_of_k_equal_directions_is_k(k: int) -> None:
    q = _orthonormal_rows(k, 16)
    # Rows +-3 q_i: zero mean, and the centered matrix has k singular values sqrt(18).
    x = torch.cat([3.0 * q, -3.0 * q])
    s = torch.linalg.svdvals(x - x.mean(0))
    assert torch.allclose(s[:k], s[0].expand(k)) and (k == 16 or s[k] < 1e-10)
    assert effective_rank(x) == pytest.approx(k, abs=1e-6)


def test_effective_rank_of_rank_one_data_is_one() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, 1, dtype=torch.float64, generator=g)
    u = torch.randn(1, 20, dtype=torch.float64, generator=g)
    assert effective_rank(a @ u) == pytest.approx(1.0, abs=1e-6)
    # Formed in float32 the product is rank 1 only up to rounding (singular values ~1e-7 of
    # the first), which the formula counts: a tiny, not a zero, excess over 1.
    assert effective_rank((a @ u).float()) == pytest.approx(1.0, abs=1e-4)


def test_effective_rank_is_invariant_to_a_constant_offset() -> None:
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -2, 10, dtype=torch.float64)
    x = torch.randn(200, 10, dtype=torch.float64, generator=g) * scales
    offset = 5.0 * torch.randn(1, 10, dtype=torch.float64, generator=g)
    plain, shifted = effective_rank(x), effective_rank(x + offset)
    assert 1.5 < plain < 9.5  # a non-trivial value, so the check below means something
    assert shifted == pytest.approx(plain, abs=1e-9)
    # RankMe does not center: the same offset changes it.
    assert abs(rankme(x + offset) - rankme(x)) > 0.1


def test_constant_data_effective_rank_zero_rankme_one() -> None:
    x = torch.full((50, 8), 0.1).float() * torch.arange(1, 9).float()
    assert effective_rank(x) == 0.0
    assert rankme(x, eps=0.0) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_rankme_of_k_equal_singular_values_is_k(k: int) -> None:
    n, d = 64, 32
    g = torch.Generator().manual_seed(k)
    u, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    x = 2.5 * u @ _orthonormal_rows(k, d, seed=k)  # exactly k singular values 2.5, not centered
    assert rankme(x, eps=0.0) == pytest.approx(k, abs=1e-6)
    # The default eps adds about min(n, d) * eps * log(1/eps) to the entropy: close, and above.
    assert k < rankme(x) < k * (1 + 1e-3)


def test_effective_rank_and_rankme_match_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24)) @ np.diag(np.linspace(2.0, 0.05, 24)) + 0.7
    t = torch.from_numpy(x)
    assert effective_rank(t) == pytest.approx(_np_effective_rank(x), rel=1e-10)
    assert rankme(t) == pytest.approx(_np_rankme(x), rel=1e-10)
    # float32 input is computed in float64 too.
    assert effective_rank(t.float()) == pytest.approx(_np_effective_rank(x), rel=1e-5)
    # Sanity: strictly between 1 and D for this anisotropic data.
    assert 1.0 < effective_rank(t) < 24.0


def test_std_of_l2_normalized_is_lightlys() -> None:
    """Lightly's function, called through a wrapper that imports it late: the same tensor."""
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    assert torch.equal(std_of_l2_normalized(z), lightly.utils.debug.std_of_l2_normalized(z))
    assert std_of_l2_normalized(z.new_ones(8, 16)).item() == 0.0  # collapse to one vector
    assert "std_of_l2_normalized" in diagnostics.__all__


def test_all_lists_existing_public_names() -> None:
    for name in diagnostics.__all__:
        assert hasattr(diagnostics, name), name
    assert diagnostics.REPRESENTATION == "representation"


# ----------------------------------------------------------------------------------------------
# Weight spectra
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_features,out_features", [(8, 5), (5, 8)])
def test_orthogonal_linear_has_unit_spectrum_and_zero_error(
    in_features: int, out_features: int
) -> None:
    layer = nn.Linear(in_features, out_features)
    short, long = sorted((in_features, out_features))
    q = _orthonormal_rows(short, long)  # wide: orthonormal rows
    weight = q if out_features <= in_features else q.t()  # tall: orthonormal columns
    with torch.no_grad():
        layer.weight.copy_(weight)
    spectra = weight_spectra(layer)
    assert list(spectra) == ["weight"]
    s = spectra["weight"]
    assert s.shape == (short,) and s.dtype == torch.float32
    assert torch.allclose(s, torch.ones(short), atol=1e-5)
    assert orthogonality_error(layer)["weight"] == pytest.approx(0.0, abs=1e-5)


def test_non_orthogonal_linear_has_error_and_spread_spectrum() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    s = weight_spectra(layer)["weight"]
    error = orthogonality_error(layer)["weight"]
    assert isinstance(error, float)
    assert error == pytest.approx(so_penalty(layer.weight).item(), rel=1e-6)
    # ||W W^T - I||_F^2 = sum_i (s_i^2 - 1)^2
    assert error == pytest.approx(((s.double() ** 2 - 1) ** 2).sum().item(), rel=1e-4)
    assert error > 0.1
    assert torch.all(s[:-1] >= s[1:])  # descending


def test_conv_spectrum_matches_numpy_svd() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=3)
    expected = np.linalg.svd(conv.weight.detach().double().numpy().reshape(8, -1), compute_uv=False)
    s = weight_spectra(conv)["weight"]
    assert s.shape == (8,)
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-5)


def test_float64_weight_stays_float64_and_no_grad() -> None:
    layer = nn.Linear(6, 4).double()
    s = weight_spectra(layer)["weight"]
    assert s.dtype == torch.float64 and not s.requires_grad


def test_resnet_weight_spectra_keys_are_the_regularized_weights(resnet: nn.Module) -> None:
    spectra = weight_spectra(resnet)
    names = [name for name, _ in regularized_weights(resnet)]
    assert list(spectra) == names
    assert len(spectra) == 20 and all(n.endswith("weight") for n in spectra)
    assert set(orthogonality_error(resnet)) == set(names)
    # conv1: 64 filters of 3*7*7 = 147 inputs -> 64 singular values.
    assert spectra["conv1.weight"].shape == (64,)
    only_layer4 = weight_spectra(resnet, include="layer4", exclude="downsample")
    assert len(only_layer4) == 4 and all(n.startswith("layer4.") for n in only_layer4)


# ----------------------------------------------------------------------------------------------
# Feature spectra
# ----------------------------------------------------------------------------------------------
def test_covariance_eigenvalues_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)) * np.arange(1, 7) + 3.0
    expected = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1], 0, None)
    ev = covariance_eigenvalues(torch.from_numpy(x).float())
    assert ev.dtype == torch.float64
    np.testing.assert_allclose(ev.numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError):
        covariance_eigenvalues(torch.zeros(1, 6))


def test_normalized_spectrum() -> None:
    ev = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert torch.equal(normalized_spectrum(ev), expected)
    assert torch.equal(normalized_spectrum(torch.zeros(3)), torch.zeros(3))


def test_resnet_feature_spectra_shapes_and_values(
    resnet: nn.Module, images: torch.Tensor
) -> None:
    resnet.train()
    spectra = feature_spectra(resnet, images, STAGES)
    assert list(spectra) == [*STAGES, "representation"]
    lengths = {name: len(ev) for name, ev in spectra.items()}
    assert lengths == {
        "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512, "representation": 512
    }
    for ev in spectra.values():
        assert ev.dtype == torch.float64 and torch.all(ev >= 0) and torch.all(ev[:-1] >= ev[1:])
        assert ev[0] > 0
        # At most N - 1 = 47 non-zero eigenvalues.
        assert torch.all(ev[47:] <= 1e-9 * ev[0])
    # Hooks removed and train mode restored.
    assert all(len(m._forward_hooks) == 0 for m in resnet.modules())
    assert resnet.training and all(m.training for m in resnet.modules())

    # Reference by hand: hooks that global-average-pool, eval mode, numpy float64.
    captured = {}
    handles = [
        getattr(resnet, name).register_forward_hook(
            lambda m, a, out, name=name: captured.__setitem__(name, out.mean(dim=(2, 3)))
        )
        for name in STAGES
    ]
    resnet.eval()
    with torch.no_grad():
        representation = resnet(images)
    resnet.train()
    for h in handles:
        h.remove()
    references = {**captured, "representation": representation}
    n = len(images)
    for name, x in references.items():
        x = x.double().numpy()
        if name in ("layer1", "layer2"):
            # D <= 128: eigvalsh of the D x D covariance itself.
            expected = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]
        else:
            # D >= 256 > N: the covariance (X_c^T X_c)/(N-1) has the non-zero eigenvalues of the
            # N x N Gram (X_c X_c^T)/(N-1), and D - N zeros (numpy's D x D eigvalsh is slow here).
            xc = x - x.mean(axis=0)
            gram_ev = np.linalg.eigvalsh(xc @ xc.T / (n - 1))[::-1]
            expected = np.concatenate([gram_ev, np.zeros(x.shape[1] - n)])
        expected = np.clip(expected, 0.0, None)
        np.testing.assert_allclose(
            spectra[name].numpy(), expected, rtol=1e-6, atol=1e-9 * expected[0]
        )


def test_features_restore_mixed_modes_and_remove_hooks_on_error(
    resnet: nn.Module, images: torch.Tensor
) -> None:
    resnet.train()
    resnet.layer1.eval()  # e.g. a frozen stage
    features(resnet, images[:4], ["layer1"])
    assert resnet.training and not resnet.layer1.training and resnet.layer2.training

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.body(x)
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        features(model, images[:4], ["body.0", "body"])
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert model.training and model.body.training
    resnet.train()


def test_unknown_layer_raises_with_its_name(resnet: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="layer5") as info:
        feature_spectra(resnet, images[:4], ["layer1", "layer5"])
    assert "layer1" in str(info.value)  # lists valid names
    assert all(len(m._forward_hooks) == 0 for m in resnet.modules())


def test_dataloader_of_tuples_and_max_samples(resnet: nn.Module, images: torch.Tensor) -> None:
    labels = torch.arange(len(images))
    loader = DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=False)
    from_loader = features(resnet, loader, ["layer3"], max_samples=40)
    assert {name: x.shape for name, x in from_loader.items()} == {
        "layer3": (40, 256),
        "representation": (40, 512),
    }
    # Eval mode: batch-norm running statistics, so batching does not change the rows.
    from_tensor = features(resnet, images, ["layer3"], max_samples=40)
    for name in from_loader:
        torch.testing.assert_close(from_loader[name], from_tensor[name], rtol=1e-4, atol=1e-5)
    spectra = feature_spectra(resnet, loader, ["layer3"])
    assert len(spectra["layer3"]) == 256
    torch.testing.assert_close(
        spectra["layer3"], covariance_eigenvalues(features(resnet, images, ["layer3"])["layer3"])
    )


def test_token_outputs_are_averaged_over_tokens() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, 4)
            return self.embed(x)[:, 0]

    torch.manual_seed(0)
    model = Tokens()
    x = torch.randn(10, 5, 4)
    out = features(model, x, ["embed"])
    torch.testing.assert_close(out["embed"], model.embed(x).mean(dim=1).detach())
    torch.testing.assert_close(out["representation"], model(x).detach())


def test_feature_spectra_reveal_a_collapsed_representation() -> None:
    # A linear encoder whose weight has rank 3 maps 16-D inputs onto a 3-D subspace.
    torch.manual_seed(0)
    encoder = nn.Linear(16, 8, bias=True)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(8, 3) @ torch.randn(3, 16))
    x = torch.randn(500, 16)
    ev = feature_spectra(encoder, x, [])["representation"]
    assert torch.all(ev[:3] > 1e-2 * ev[0]) and torch.all(ev[3:] < 1e-6 * ev[0])
    assert torch.count_nonzero(normalized_spectrum(ev) > 1e-6) == 3
    assert 1.0 < effective_rank(encoder(x).detach()) <= 3.0
