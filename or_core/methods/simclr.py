"""SimCLR: Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations" (ICML 2020), https://arxiv.org/abs/2002.05709.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod
from or_core.methods.view_recipes import simclr_views


class SimCLR(SSLMethod):
    """SimCLR: the NT-Xent (InfoNCE) loss between the projections of two views, the other
    ``2N - 2`` images of the batch serving as negatives.

    Projector: lightly's ``SimCLRProjectionHead`` (2 layers, batch norm). Loss: lightly's
    ``NTXentLoss``; ``gather_distributed=True`` gathers the negatives of all processes under DDP
    (the SimCLR paper's global negatives).

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/simclr.yaml``):
    projector 2048 -> 256, temperature 0.2, LARS lr 0.4 (batch 256), weight decay 1e-4, eta
    0.02, symmetric augmentations. (lightly's head default is 2048 -> 128 and its ImageNet
    benchmark temperature 0.1, the SimCLR paper's ImageNet values.)

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        temperature: NT-Xent temperature.
        gather_distributed: gather negatives across processes (DDP).
    """

    name = "simclr"
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.4,
        weight_decay=1e-4,
        source="solo-learn scripts/pretrain/cifar/simclr.yaml (ResNet-18, batch 256)",
    )

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """SimCLR's two views (:func:`~or_core.methods.view_recipes.simclr_views`)."""
        return simclr_views(base)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 256,
        temperature: float = 0.2,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = SimCLRProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        z0, z1 = (self.projection_head(self.features(v)) for v in views)
        return self.criterion(z0, z1)
