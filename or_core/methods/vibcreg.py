"""VIbCReg: Lee & Aune, "VIbCReg: Variance-Invariance-better-Covariance Regularization for
Self-Supervised Learning on Time Series" (2021), https://arxiv.org/abs/2109.00783; its IterNorm
is Huang, Zhou, Zhu, Liu & Shao, "Iterative Normalization: Beyond Standardization towards
Efficient Whitening" (CVPR 2019), https://arxiv.org/abs/1904.03441.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from lightly.loss.vicreg_loss import invariance_loss, variance_loss
from lightly.models.modules.heads import ProjectionHead
from lightly.utils import dist
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod
from or_core.methods.view_recipes import HALF_JITTER

__all__ = ["IterNorm", "VIbCReg", "normalized_covariance_loss"]


class IterNorm(nn.Module):
    """Iterative normalization (Huang et al. 2019): an approximate whitening of ``(N, D)``
    features in groups of ``c`` channels by Newton's iterations, without an eigendecomposition.

    Per group, with ``X`` the centred ``(c, N)`` block:

        Sigma = eps * I + X X^T / N,   Sigma_N = Sigma / tr(Sigma)
        P_0 = I,   P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2   (k = 1..T)
        output = P_T / sqrt(tr(Sigma)) X          (-> Sigma^{-1/2} X as T grows)

    then ``weight * output + bias`` with ``affine``. Trace normalization puts the eigenvalues of
    ``Sigma_N`` in (0, 1], where the iteration converges; a small ``T`` whitens the strong
    directions and leaves the weak ones partly unwhitened (the paper's point). Keep ``T`` small:
    in float32 this uncoupled Newton iteration amplifies its rounding errors once converged, the
    sooner the worse the conditioning (measured on 4 x 4 groups: with singular values
    0.6..1.4, within 1e-6 of ``Sigma^{-1/2}`` from 10 steps to 20; with a random mixing, closest
    at 10 steps, diverging past 15). In eval mode the
    running mean and whitening matrix (momentum ``momentum``) are used. Computed in float32.

    Groups: ``c = ceil(D / num_groups)`` channels, halved until it divides ``D``; ``D // c``
    groups (the grouping of the IterNorm code VIbCReg uses).

    Args:
        num_features: ``D``.
        num_groups: the number of groups asked for.
        iterations: ``T``.
        eps: the ridge added to each group's covariance.
        momentum: of the running statistics.
        affine: a learnable per-feature scale (init 1) and shift (init 0).
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 64,
        iterations: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        channels = max(1, math.ceil(num_features / num_groups))
        while num_features % channels:
            channels //= 2
        self.num_features = num_features
        self.num_channels = channels
        self.num_groups = num_features // channels
        self.iterations = iterations
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.running_mean: Tensor
        self.running_wm: Tensor
        self.register_buffer("running_mean", torch.zeros(self.num_groups, channels, 1))
        eye = torch.eye(channels).expand(self.num_groups, channels, channels).clone()
        self.register_buffer("running_wm", eye)

    def whitening_matrix(self, centred: Tensor) -> Tensor:
        """``P_T / sqrt(tr(Sigma))`` for each group of ``centred`` ``(G, c, N)``."""
        n = centred.shape[-1]
        eye = torch.eye(self.num_channels, device=centred.device, dtype=centred.dtype)
        sigma = self.eps * eye + centred @ centred.transpose(1, 2) / n
        trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(-1, 1, 1)
        sigma_n = sigma / trace
        p = eye.expand_as(sigma)
        for _ in range(self.iterations):
            p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
        return p / trace.sqrt()

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            n = x.shape[0]
            grouped = x.float().t().reshape(self.num_groups, self.num_channels, n)
            if self.training:
                mean = grouped.mean(dim=-1, keepdim=True)
                wm = self.whitening_matrix(grouped - mean)
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_wm.lerp_(wm.detach(), self.momentum)
            else:
                mean, wm = self.running_mean, self.running_wm
            out = (wm @ (grouped - mean)).reshape(self.num_features, n).t()
            if self.weight is not None:
                out = out * self.weight + self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, groups={self.num_groups} x {self.num_channels}, "
            f"T={self.iterations}, affine={self.weight is not None}"
        )


def normalized_covariance_loss(z: Tensor) -> Tensor:
    """VIbCReg's covariance term: the mean squared off-diagonal entry of the correlation-like
    matrix of ``z`` ``(N, D)``,

        z_hat_j = (z_j - mean(z_j)) / ||z_j - mean(z_j)||   (column j, over the batch)
        c(z) = sum_{i != j} (z_hat_i . z_hat_j)^2 / D^2

    in [0, 1) whatever the scale of ``z`` (VICReg's covariance term is not normalized)."""
    centred = z - z.mean(dim=0)
    normed = F.normalize(centred, dim=0)
    corr = normed.t() @ normed
    off_diagonal = corr - torch.diag_embed(corr.diagonal())
    return off_diagonal.pow(2).mean()


class VIbCReg(SSLMethod):
    """VIbCReg: VICReg with an IterNorm at the end of the projector and a normalized covariance
    term:

        loss = lambda * MSE(z0, z1) + mu * [v(z0) + v(z1)] + nu * [c(z0) + c(z1)]

    with ``v(z) = mean_j relu(1 - sqrt(Var(z_j) + 1e-4))`` (lightly's VICReg
    ``variance_loss``; ``MSE`` is its ``invariance_loss``) and ``c`` the mean squared
    off-diagonal correlation (:func:`normalized_covariance_loss`). With ``gather_distributed``
    the variance and covariance terms see the projections of all processes (lightly's
    ``dist.gather``, with gradients).

    Projector: lightly's ``ProjectionHead`` with VIbCReg's blocks (linear, BN, GELU, linear,
    BN, GELU, linear), then :class:`IterNorm` (64 groups, 5 iterations) when ``iternorm``.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/vibcreg.yaml``):
    projector 2048 -> 2048, weights 25 / 25 / 200, IterNorm on, LARS lr 0.3 (batch 256), weight
    decay 1e-4, eta 0.02, no clip_lr (the recipe leaves it off), and its views
    (:meth:`view_recipe`).

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        invariance_weight, variance_weight, covariance_weight: lambda, mu and nu.
        iternorm: end the projector with an :class:`IterNorm`.
        gather_distributed: variance and covariance over all processes' projections (DDP).
    """

    name = "vibcreg"
    # solo-learn scripts/pretrain/cifar/vibcreg.yaml: lars, batch_size 256, lr 0.3,
    # weight_decay 1e-4, eta 0.02, exclude_bias_n_norm True, clip_lr not set (False in
    # solo-learn's LARS).
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.3,
        weight_decay=1e-4,
        clip_lr=False,
        source="solo-learn scripts/pretrain/cifar/vibcreg.yaml (ResNet-18, batch 256)",
    )

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """solo-learn's ``scripts/pretrain/cifar/vibcreg.yaml``: two equal views, crop scale
        (0.2, 1), jitter 0.4/0.4/0.2/0.1 with prob 0.8, gray 0.2, solarization 0.1, no blur:
        lightly's ``VICRegTransform`` with ``min_scale=0.2`` and without its blur."""
        view = replace(
            base, **HALF_JITTER, min_scale=0.2, solarize_prob=0.1, solarize_before_blur=True
        )
        return [view] * 2

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 200.0,
        iternorm: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        blocks = [
            (feature_dim, proj_hidden_dim, nn.BatchNorm1d(proj_hidden_dim), nn.GELU()),
            (proj_hidden_dim, proj_hidden_dim, nn.BatchNorm1d(proj_hidden_dim), nn.GELU()),
            (proj_hidden_dim, proj_output_dim, None, None),
        ]
        self.projection_head = nn.Sequential(
            ProjectionHead(blocks), IterNorm(proj_output_dim) if iternorm else nn.Identity()
        )
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.gather_distributed = gather_distributed

    def parameter_groups(
        self, weight_decay: float, exclude_bias_and_norm: bool = True
    ) -> list[dict]:
        """:meth:`SSLMethod.parameter_groups`, with :class:`IterNorm`'s scale among the
        undecayed norm parameters (lightly's ``get_weight_decay_parameters`` knows torch's norm
        layers only; its bias is found by name)."""
        groups = super().parameter_groups(weight_decay, exclude_bias_and_norm)
        if exclude_bias_and_norm:
            decay, no_decay = groups
            iternorms = [m for m in self.modules() if isinstance(m, IterNorm)]
            norm = {id(p) for m in iternorms for p in m.parameters()}
            no_decay["params"] += [p for p in decay["params"] if id(p) in norm]
            decay["params"] = [p for p in decay["params"] if id(p) not in norm]
        return groups

    def vibcreg_loss(self, z0: Tensor, z1: Tensor) -> dict[str, Tensor]:
        """The loss and its three terms (unweighted) for projections ``z0``, ``z1``."""
        invariance = invariance_loss(z0, z1)
        if self.gather_distributed and dist.world_size() > 1:
            z0, z1 = torch.cat(dist.gather(z0)), torch.cat(dist.gather(z1))
        variance = variance_loss(z0) + variance_loss(z1)
        covariance = normalized_covariance_loss(z0) + normalized_covariance_loss(z1)
        loss = (
            self.invariance_weight * invariance
            + self.variance_weight * variance
            + self.covariance_weight * covariance
        )
        return {
            "ssl_loss": loss,
            "invariance_loss": invariance.detach(),
            "variance_loss": variance.detach(),
            "covariance_loss": covariance.detach(),
        }

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> dict[str, Tensor]:
        z0, z1 = (self.projection_head(self.features(v)) for v in views)
        return self.vibcreg_loss(z0, z1)
