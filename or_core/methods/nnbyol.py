"""NNBYOL: BYOL whose targets are nearest neighbours in a support set, the BYOL variant of
Dwibedi, Aytar, Tompson, Sermanet & Zisserman, "With a Little Help from My Friends:
Nearest-Neighbor Contrastive Learning of Visual Representations" (ICCV 2021),
https://arxiv.org/abs/2104.14548 (its section 4.5), on Grill et al., "Bootstrap Your Own Latent"
(NeurIPS 2020), https://arxiv.org/abs/2006.07733.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from lightly.models.modules.nn_memory_bank import NNMemoryBankModule
from torch import Tensor, nn

from or_core.methods.base import OptimizerDefaults, persistent_memory_bank
from or_core.methods.byol import BYOL


class NNBYOL(BYOL):
    """NNBYOL: BYOL (:class:`~or_core.methods.byol.BYOL`: online backbone, projector and
    predictor; EMA target backbone and projector) where the target of each view's prediction is
    the nearest neighbour, in a support set of past target projections, of the other view's
    target projection:

        loss = 2 * (NCS(p0, NN(t1)) + NCS(p1, NN(t0)))

    with ``NCS = -cos`` (BYOL's ``2 - 2 cos`` per direction, less its constant), ``t`` the EMA
    target's l2-normalized projections and ``NN`` lightly's ``NNMemoryBankModule`` (cosine
    nearest neighbour in a queue of ``queue_size`` target projections, updated with ``t0`` after
    the look-ups in training mode; saved in ``state_dict``).

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/nnbyol.yaml``):
    projector 4096 -> 256, predictor hidden 4096, queue 65536, tau 0.99 -> 1.0, LARS lr 1.0
    (batch 256), weight decay 1e-5, eta 0.02, clip_lr, asymmetric augmentations
    (``augmentations/asymmetric.yaml``: BYOL's views). No ImageNet recipe: BYOL's are not
    inherited.

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        pred_hidden_dim: predictor hidden size.
        queue_size: size of the support set.
        base_momentum, final_momentum: EMA momentum at the start and the end of training.
    """

    name = "nnbyol"
    # The cpu profile's support set: lightly's examples/pytorch/nnclr.py size (4096, "to run on a
    # small dataset"); at the recipe's size the look-ups cost more than the rest of a cpu-profile
    # step (results/benchmarks/NOTES.md#nn-support-set-cpu).
    profile_settings = {"cpu": {"method_kwargs": {"queue_size": 4096}}}
    # solo-learn scripts/pretrain/cifar/nnbyol.yaml: lars, batch_size 256, lr 1.0,
    # weight_decay 1e-5, eta 0.02, clip_lr True, exclude_bias_n_norm True.
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=1.0,
        weight_decay=1e-5,
        source="solo-learn scripts/pretrain/cifar/nnbyol.yaml (ResNet-18, batch 256)",
    )
    optimizer_recipes = {}  # BYOL's ImageNet recipes are BYOL's, not measured for NNBYOL

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 4096,
        proj_output_dim: int = 256,
        pred_hidden_dim: int = 4096,
        queue_size: int = 65536,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
    ) -> None:
        super().__init__(
            backbone,
            feature_dim,
            regularizer,
            gamma,
            proj_hidden_dim=proj_hidden_dim,
            proj_output_dim=proj_output_dim,
            pred_hidden_dim=pred_hidden_dim,
            base_momentum=base_momentum,
            final_momentum=final_momentum,
        )
        self.memory_bank = persistent_memory_bank(
            NNMemoryBankModule(size=(queue_size, proj_output_dim))
        )

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        predictions = [self.prediction_head(self.projection_head(self.features(v))) for v in views]
        t0, t1 = (F.normalize(self.forward_target(v), dim=1) for v in views)
        # t1's look-up first: t0 is pushed by the second call, after its own look-up (lightly's
        # bank answers from its content before the push), so neither view finds the other.
        nn1 = self.memory_bank(t1, update=False)
        nn0 = self.memory_bank(t0, update=self.training)
        return 2 * (self.criterion(predictions[0], nn1) + self.criterion(predictions[1], nn0))
