"""NNCLR: Dwibedi, Aytar, Tompson, Sermanet & Zisserman, "With a Little Help from My Friends:
Nearest-Neighbor Contrastive Learning of Visual Representations" (ICCV 2021),
https://arxiv.org/abs/2104.14548.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightly.loss import NTXentLoss
from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead
from lightly.models.modules.nn_memory_bank import NNMemoryBankModule
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod, persistent_memory_bank
from or_core.methods.view_recipes import simclr_views


class NNCLR(SSLMethod):
    """NNCLR: contrastive learning where the positive of a view's prediction is the nearest
    neighbour, in a support set of past projections, of the other view's projection.

    ``loss = (NTXent(NN(z0), p1) + NTXent(NN(z1), p0)) / 2`` with ``NN`` lightly's
    ``NNMemoryBankModule`` (the support set, a queue of ``queue_size`` projections, updated with
    ``z1`` in training mode; saved in ``state_dict``) and lightly's ``NTXentLoss``.
    Heads: lightly's ``NNCLRProjectionHead`` (3 layers, batch norm on all) and
    ``NNCLRPredictionHead`` (2 layers).

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/nnclr.yaml``):
    projector 2048 -> 256, predictor hidden 4096, queue 65536, temperature 0.2, LARS lr 0.4
    (batch 256), weight decay 1e-5, eta 0.02. (The NNCLR paper, ImageNet: the same heads, queue
    98304, temperature 0.1.)

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        pred_hidden_dim: predictor hidden size.
        queue_size: size of the support set.
        temperature: NT-Xent temperature.
        gather_distributed: gather negatives across processes (DDP); the support set stays
            per process.
    """

    name = "nnclr"
    # The cpu profile's support set: lightly's examples/pytorch/nnclr.py size (4096, "to run on a
    # small dataset"); at the recipe's size the look-ups cost more than the rest of a cpu-profile
    # step (results/benchmarks/NOTES.md#nn-support-set-cpu).
    profile_settings = {"cpu": {"method_kwargs": {"queue_size": 4096}}}
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.4,
        weight_decay=1e-5,
        source="solo-learn scripts/pretrain/cifar/nnclr.yaml (ResNet-18, batch 256)",
    )

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """SimCLR's two views (:func:`~or_core.methods.view_recipes.simclr_views`), as
        lightly's NNCLR examples use."""
        return simclr_views(base)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 256,
        pred_hidden_dim: int = 4096,
        queue_size: int = 65536,
        temperature: float = 0.2,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = NNCLRProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.prediction_head = NNCLRPredictionHead(
            proj_output_dim, pred_hidden_dim, proj_output_dim
        )
        self.memory_bank = persistent_memory_bank(
            NNMemoryBankModule(size=(queue_size, proj_output_dim))
        )
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        z0, z1 = (self.projection_head(self.features(v)) for v in views)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        nn0 = self.memory_bank(z0.detach(), update=False)
        nn1 = self.memory_bank(z1.detach(), update=self.training)
        return 0.5 * (self.criterion(nn0, p1) + self.criterion(nn1, p0))
