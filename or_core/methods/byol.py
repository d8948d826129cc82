"""BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"
(NeurIPS 2020), https://arxiv.org/abs/2006.07733.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch import Tensor, nn

from or_core.methods.base import OptimizerDefaults, SSLMethod


class BYOL(SSLMethod):
    """BYOL: an online network (backbone, projector, predictor) predicts the projection of an EMA
    target network (backbone, projector) of the other view.

    The loss is lightly's symmetric form ``2 * (NCS(p0, t1) + NCS(p1, t0))`` with
    ``NCS = -cos``: BYOL's normalized-L2 loss ``||p/|p| - t/|t|||^2 = 2 - 2 cos``, summed over
    both directions, minus the constant 4. The target is ``copy.deepcopy`` of the online backbone
    and projector with gradients off, moved by ``update_momentum`` with a momentum that goes from
    ``base_momentum`` to ``final_momentum`` on a cosine of ``progress``.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/byol.yaml``):
    projector 4096 -> 256, predictor 4096, tau 0.99 -> 1.0, LARS lr 1.0 (batch 256), weight
    decay 1e-5, eta 0.02, asymmetric augmentations. Heads are lightly's ``BYOLProjectionHead``
    and ``BYOLPredictionHead`` (the BYOL paper's sizes). lightly's ImageNet ResNet-50 benchmark
    uses LARS lr 0.45, weight decay 1e-6 with the same heads and momentum.

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        pred_hidden_dim: predictor hidden size (its output is ``proj_output_dim``).
        base_momentum, final_momentum: EMA momentum at the start and the end of training.
    """

    name = "byol"
    augmentation = "byol"
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=1.0,
        weight_decay=1e-5,
        source="solo-learn scripts/pretrain/cifar/byol.yaml (ResNet-18, batch 256)",
    )

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 4096,
        proj_output_dim: int = 256,
        pred_hidden_dim: int = 4096,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = BYOLProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.prediction_head = BYOLPredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projection_head = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection_head)
        self.criterion = NegativeCosineSimilarity()
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.backbone, self.target_backbone),
            (self.projection_head, self.target_projection_head),
        ]

    def forward_target(self, x: Tensor) -> Tensor:
        """The target projection of ``x`` (no gradient)."""
        return self.target_projection_head(self.target_backbone(x).flatten(start_dim=1)).detach()

    def byol_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The symmetric BYOL loss and the online representations ``h`` of the two views."""
        features = [self.features(v) for v in views]
        predictions = [self.prediction_head(self.projection_head(h)) for h in features]
        targets = [self.forward_target(v) for v in views]
        loss = 2 * (
            self.criterion(predictions[0], targets[1]) + self.criterion(predictions[1], targets[0])
        )
        return loss, features

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        loss, _ = self.byol_loss(views)
        return loss
