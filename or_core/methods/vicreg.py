"""VICReg: Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning" (ICLR 2022), https://arxiv.org/abs/2105.04906.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod
from or_core.methods.view_recipes import HALF_JITTER


class VICReg(SSLMethod):
    """VICReg: invariance (MSE between the two views' projections), variance (a hinge keeping
    each dimension's standard deviation at 1) and covariance (off-diagonal covariance to 0).

    Projector: lightly's ``VICRegProjectionHead`` (3 layers, batch norm and ReLU after the first
    two). Loss: lightly's ``VICRegLoss`` (``gather_distributed`` gathers the embeddings of all
    processes for the variance and covariance terms).

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/vicreg.yaml``):
    projector 2048 -> 2048, weights invariance 25, variance 25, covariance 1, LARS lr 0.3 (batch
    256), weight decay 1e-4, eta 0.02. (The VICReg paper, ImageNet: projector 8192 -> 8192, the
    same weights, LARS base lr 0.2, weight decay 1e-6.)

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        num_layers: projector depth.
        invariance_weight, variance_weight, covariance_weight: VICReg's lambda, mu and nu.
        gather_distributed: gather embeddings across processes (DDP).
    """

    name = "vicreg"
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.3,
        weight_decay=1e-4,
        source="solo-learn scripts/pretrain/cifar/vicreg.yaml (ResNet-18, batch 256)",
    )

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """Two equal views (lightly's ``VICRegTransform``): jitter 0.4/0.4/0.2/0.1 with prob 0.8,
        gray 0.2, scale (0.08, 1), solarization 0.1 before a blur of prob 0.5 (lightly's order)."""
        view = replace(
            base, **HALF_JITTER, solarize_prob=0.1, solarize_before_blur=True, blur_prob=0.5
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
        num_layers: int = 3,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = VICRegProjectionHead(
            feature_dim, proj_hidden_dim, proj_output_dim, num_layers=num_layers
        )
        self.criterion = VICRegLoss(
            lambda_param=invariance_weight,
            mu_param=variance_weight,
            nu_param=covariance_weight,
            gather_distributed=gather_distributed,
        )

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        z0, z1 = (self.projection_head(self.features(v)) for v in views)
        return self.criterion(z0, z1)
