"""SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning" (CVPR 2021),
https://arxiv.org/abs/2011.10566.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod
from or_core.methods.view_recipes import moco_views


class SimSiam(SSLMethod):
    """SimSiam: the predictor output of one view matches the stop-gradient projection of the
    other, ``(NCS(p0, sg(z1)) + NCS(p1, sg(z0))) / 2`` with ``NCS = -cos``; no EMA target.

    Heads: lightly's ``SimSiamProjectionHead`` (3 layers, batch norm on every layer, the last
    without affine) and ``SimSiamPredictionHead`` (2-layer bottleneck).

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/simsiam.yaml``):
    projector 2048 -> 2048, predictor hidden 512, SGD lr 0.5 (batch 256), weight decay 1e-5,
    weak symmetric augmentations. (The SimSiam paper, ImageNet: SGD lr 0.05, weight decay 1e-4,
    same heads.)

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        pred_hidden_dim: predictor bottleneck (its output is ``proj_output_dim``).
    """

    name = "simsiam"
    default_optimizer = OptimizerDefaults(
        name="sgd",
        lr=0.5,
        weight_decay=1e-5,
        source="solo-learn scripts/pretrain/cifar/simsiam.yaml (ResNet-18, batch 256)",
    )

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """SimSiam's two views, MoCo v2's
        (:func:`~or_core.methods.view_recipes.moco_views`)."""
        return moco_views(base)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
        pred_hidden_dim: int = 512,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = SimSiamProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.prediction_head = SimSiamPredictionHead(
            proj_output_dim, pred_hidden_dim, proj_output_dim
        )
        self.criterion = NegativeCosineSimilarity()

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        z0, z1 = (self.projection_head(self.features(v)) for v in views)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
