"""Barlow Twins: Zbontar, Jing, Misra, LeCun & Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction" (ICML 2021), https://arxiv.org/abs/2103.03230.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import Tensor, nn

from or_core.methods.base import OptimizerDefaults, SSLMethod


class BarlowTwins(SSLMethod):
    """Barlow Twins: the cross-correlation matrix of the two views' batch-standardized
    projections is driven to the identity, ``sum_i (1 - C_ii)^2 + lambda * sum_{i!=j} C_ij^2``.

    Projector: lightly's ``BarlowTwinsProjectionHead`` (3 layers, batch norm and ReLU after the
    first two). Loss: lightly's ``BarlowTwinsLoss`` (``gather_distributed`` sums the
    cross-correlation over processes), times ``scale_loss``.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/barlow.yaml``):
    projector 2048 -> 2048, lambda 0.0051, loss scaled by 0.1, LARS lr 0.3 (batch 256), weight
    decay 1e-4, eta 0.02, asymmetric augmentations. (The Barlow Twins paper, ImageNet: projector
    8192 -> 8192, lambda 0.0051, no scaling, LARS lr 0.2 for weights.)

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        lambda_param: weight of the off-diagonal (redundancy reduction) term.
        scale_loss: factor on the whole loss (solo-learn's ``scale_loss``).
        gather_distributed: sum the cross-correlation over processes (DDP).
    """

    name = "barlowtwins"
    aliases = ("barlow",)
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.3,
        weight_decay=1e-4,
        source="solo-learn scripts/pretrain/cifar/barlow.yaml (ResNet-18, batch 256)",
    )

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
        lambda_param: float = 0.0051,
        scale_loss: float = 0.1,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = BarlowTwinsProjectionHead(
            feature_dim, proj_hidden_dim, proj_output_dim
        )
        self.criterion = BarlowTwinsLoss(
            lambda_param=lambda_param, gather_distributed=gather_distributed
        )
        self.scale_loss = scale_loss

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        z0, z1 = (self.projection_head(self.features(v)) for v in views)
        return self.scale_loss * self.criterion(z0, z1)
