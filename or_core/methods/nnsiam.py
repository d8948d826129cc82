"""NNSiam: SimSiam whose targets are nearest neighbours in a support set, the SimSiam variant of
Dwibedi, Aytar, Tompson, Sermanet & Zisserman, "With a Little Help from My Friends:
Nearest-Neighbor Contrastive Learning of Visual Representations" (ICCV 2021),
https://arxiv.org/abs/2104.14548 (its section 4.5), on Chen & He, "Exploring Simple Siamese
Representation Learning" (CVPR 2021), https://arxiv.org/abs/2011.10566.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from lightly.models.modules.nn_memory_bank import NNMemoryBankModule
from torch import Tensor, nn

from or_core.methods.base import OptimizerDefaults, SSLMethod, persistent_memory_bank


class NNSiam(SSLMethod):
    """NNSiam: SimSiam (no EMA target, stop-gradient) where the target of each view's prediction
    is the nearest neighbour, in a support set of past projections, of the other view's
    projection:

        loss = (NCS(p0, NN(z1)) + NCS(p1, NN(z0))) / 2

    with ``NCS = -cos``, ``z`` the online projections (l2-normalized, without gradient: the
    look-up is the stop-gradient) and ``NN`` lightly's ``NNMemoryBankModule`` (cosine nearest
    neighbour in a queue of ``queue_size`` projections, updated with ``z0`` after the look-ups
    in training mode; saved in ``state_dict``).

    Heads: lightly's ``SimSiamProjectionHead`` (3 layers, batch norm on each, the last without
    affine) and ``SimSiamPredictionHead`` (2-layer bottleneck), SimSiam's.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/nnsiam.yaml``):
    projector 2048 -> 2048, predictor hidden 4096, queue 65536, SGD lr 0.5 (batch 256), weight
    decay 1e-5, asymmetric augmentations (``augmentations/asymmetric.yaml``: BYOL's views,
    :meth:`SSLMethod.view_recipe`'s default). (That recipe's ``momentum`` block is unused:
    NNSiam has no EMA target.)

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        pred_hidden_dim: predictor hidden size (its output is ``proj_output_dim``).
        queue_size: size of the support set.
    """

    name = "nnsiam"
    # The cpu profile's support set: lightly's examples/pytorch/nnclr.py size (4096, "to run on a
    # small dataset"); at the recipe's size the look-ups cost more than the rest of a cpu-profile
    # step (results/benchmarks/NOTES.md#nn-support-set-cpu).
    profile_settings = {"cpu": {"method_kwargs": {"queue_size": 4096}}}
    # solo-learn scripts/pretrain/cifar/nnsiam.yaml: sgd, batch_size 256, lr 0.5,
    # weight_decay 1e-5.
    default_optimizer = OptimizerDefaults(
        name="sgd",
        lr=0.5,
        weight_decay=1e-5,
        source="solo-learn scripts/pretrain/cifar/nnsiam.yaml (ResNet-18, batch 256)",
    )

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 2048,
        pred_hidden_dim: int = 4096,
        queue_size: int = 65536,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = SimSiamProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.prediction_head = SimSiamPredictionHead(
            proj_output_dim, pred_hidden_dim, proj_output_dim
        )
        self.memory_bank = persistent_memory_bank(
            NNMemoryBankModule(size=(queue_size, proj_output_dim))
        )
        self.criterion = NegativeCosineSimilarity()

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        z0, z1 = (self.projection_head(self.features(v)) for v in views)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        z0, z1 = (F.normalize(z.detach(), dim=1) for z in (z0, z1))
        # z1's look-up first: z0 is pushed by the second call, after its own look-up.
        nn1 = self.memory_bank(z1, update=False)
        nn0 = self.memory_bank(z0, update=self.training)
        return 0.5 * (self.criterion(p0, nn1) + self.criterion(p1, nn0))
