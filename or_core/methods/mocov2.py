"""MoCo v2: Chen, Fan, Girshick & He, "Improved Baselines with Momentum Contrastive Learning"
(2020), https://arxiv.org/abs/2003.04297, on He, Fan, Wu, Xie & Girshick, "Momentum Contrast for
Unsupervised Visual Representation Learning" (CVPR 2020), https://arxiv.org/abs/1911.05722.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle
from lightly.utils import dist
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod, persistent_memory_bank
from or_core.methods.view_recipes import moco_views


class MoCoV2(SSLMethod):
    """MoCo v2: the online query encoder (backbone + MLP projector) contrasts each query with the
    key of the other view, computed by an EMA key encoder, against a queue of past keys.

    Loss: lightly's ``NTXentLoss`` with a memory bank (``memory_bank_size=(queue_size, dim)``):
    the positive is the key of the same image, the negatives are the queue, and the keys are
    enqueued after each training call. With ``symmetric=True`` (solo-learn's "MoCo V2+") both
    views serve as queries, ``(L(q0, k1) + L(q1, k0)) / 2``, each direction with its own queue,
    so a key never meets its own query as a negative; the queues are saved in ``state_dict``.
    The key encoder is ``copy.deepcopy`` of the online backbone and projector with gradients
    off; its input is shuffled with lightly's ``batch_shuffle`` (across processes under DDP:
    MoCo's shuffling BN).

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/mocov2plus.yaml``):
    projector 2048 -> 256 (``MoCoProjectionHead``: 2 layers, no batch norm), queue 32768,
    temperature 0.2, tau 0.99 -> 0.999, symmetric loss, SGD lr 0.3 (batch 256), weight decay
    1e-4. The MoCo v2 paper (ImageNet): output 128, queue 65536, tau 0.999 constant, one-sided
    loss, SGD lr 0.03 (batch 256), weight decay 1e-4.

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        queue_size: number of past keys per queue.
        temperature: InfoNCE temperature.
        base_momentum, final_momentum: EMA momentum at the start and the end of training.
        symmetric: both views as queries (MoCo V2+), else only view 0 against the key of view 1.
        gather_distributed: under DDP, gather the keys of all processes before enqueueing.
    """

    name = "mocov2"
    aliases = ("moco",)
    default_optimizer = OptimizerDefaults(
        name="sgd",
        lr=0.3,
        weight_decay=1e-4,
        source="solo-learn scripts/pretrain/cifar/mocov2plus.yaml (ResNet-18, batch 256)",
    )

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """MoCo v2's two views (:func:`~or_core.methods.view_recipes.moco_views`)."""
        return moco_views(base)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 256,
        queue_size: int = 32768,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        final_momentum: float = 0.999,
        symmetric: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = MoCoProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.add_ema_targets("key", base_momentum, final_momentum)
        self.symmetric = symmetric
        bank = (queue_size, proj_output_dim)
        self.criteria = nn.ModuleList(
            NTXentLoss(temperature, memory_bank_size=bank, gather_distributed=gather_distributed)
            for _ in range(2 if symmetric else 1)
        )
        for criterion in self.criteria:
            persistent_memory_bank(criterion.memory_bank)  # the queues go into state_dict

    def forward_key(self, x: Tensor) -> Tensor:
        """The key projection of ``x`` by the EMA encoder, with shuffled batch norm."""
        distributed = dist.world_size() > 1
        x, shuffle = batch_shuffle(x, distributed=distributed)
        return batch_unshuffle(self.ema_projection(x), shuffle, distributed=distributed)

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        q0 = self.projection_head(self.features(views[0]))
        k1 = self.forward_key(views[1])
        loss = self.criteria[0](q0, k1)
        if self.symmetric:
            q1 = self.projection_head(self.features(views[1]))
            k0 = self.forward_key(views[0])
            loss = 0.5 * (loss + self.criteria[1](q1, k0))
        return loss
