"""ReSSL: Zheng, Wang, You, Qian, Zhang, Wang & Xu, "ReSSL: Relational Self-Supervised Learning
with Weak Augmentation" (NeurIPS 2021), https://arxiv.org/abs/2107.09282.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod, persistent_memory_bank
from or_core.methods.view_recipes import HALF_JITTER

__all__ = ["ReSSL", "relational_loss"]


def relational_loss(
    query: Tensor, key: Tensor, bank: Tensor, temperature_q: float, temperature_k: float
) -> Tensor:
    """ReSSL's loss (the paper's eq. 3 and 4): the cross-entropy between the key's similarity
    distribution over the bank (the teacher, sharpened by ``temperature_k < temperature_q``, no
    gradient) and the query's:

        p_k = softmax(k . bank^T / tau_k),  p_q = softmax(q . bank^T / tau_q)
        loss = -mean_i sum_j p_k[i, j] log p_q[i, j]

    ``query``, ``key`` (N, D) and ``bank`` (M, D) are l2-normalized by the caller.
    """
    log_p_q = F.log_softmax(query @ bank.t() / temperature_q, dim=1)
    p_k = F.softmax(key.detach() @ bank.t() / temperature_k, dim=1)
    return -(p_k * log_p_q).sum(dim=1).mean()


class ReSSL(SSLMethod):
    """ReSSL: the online encoder's projection of a strongly augmented view matches, in its
    similarities to a queue of past keys, the sharper similarities of an EMA key encoder's
    projection of a weakly augmented view (:func:`relational_loss`):

        loss = H(softmax(k1 . Q^T / tau_k), softmax(q0 . Q^T / tau_q))

    with ``q0`` the l2-normalized online projection of view 0 (strong), ``k1`` the key of view 1
    (weak: crop and flip only) and ``Q`` a queue of ``queue_size`` past keys (lightly's
    ``MemoryBankModule``, random unit vectors at the start, ``k1`` pushed after each training
    call; saved in ``state_dict``). One direction only, as in the paper. The key encoder is
    ``copy.deepcopy`` of the online backbone and projector with gradients off, moved by
    ``update_momentum``.

    Projector: lightly's ``MoCoProjectionHead`` (linear, ReLU, linear; no batch norm), the
    head of the paper and of solo-learn's ``solo/methods/ressl.py``.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/ressl.yaml``):
    projector 4096 -> 256, temperatures q 0.1 and k 0.04, tau 0.99 -> 1.0, SGD lr 0.05 (batch
    256), weight decay 1e-4; the queue size that recipe leaves is ``solo/methods/ressl.py``'s
    default, 65536. Views: ``augmentations/ressl.yaml`` (:meth:`view_recipe`).

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        queue_size: number of past keys in the queue.
        temperature_q, temperature_k: softmax temperatures of the query and of the key.
        base_momentum, final_momentum: EMA momentum at the start and the end of training.
        gather_distributed: under DDP, push the keys of all processes into the queue.
    """

    name = "ressl"
    # solo-learn scripts/pretrain/cifar/ressl.yaml: sgd, batch_size 256, lr 0.05,
    # weight_decay 1e-4.
    default_optimizer = OptimizerDefaults(
        name="sgd",
        lr=0.05,
        weight_decay=1e-4,
        source="solo-learn scripts/pretrain/cifar/ressl.yaml (ResNet-18, batch 256)",
    )

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """solo-learn's ``scripts/pretrain/cifar/augmentations/ressl.yaml``: view 0 (the
        query's, strong) crops at scale (0.08, 1), jitter 0.4/0.4/0.2/0.1 with prob 0.8, gray
        0.2, blur 0.5 (off at 32 px); view 1 (the key's, weak) only crops at (0.08, 1) and
        flips."""
        strong = replace(base, **HALF_JITTER, blur_prob=0.5)
        weak = replace(base, cj_prob=0.0, gray_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
        return [strong, weak]

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 4096,
        proj_output_dim: int = 256,
        queue_size: int = 65536,
        temperature_q: float = 0.1,
        temperature_k: float = 0.04,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = MoCoProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.add_ema_targets("key", base_momentum, final_momentum)
        self.queue = persistent_memory_bank(
            MemoryBankModule(
                size=(queue_size, proj_output_dim),
                gather_distributed=gather_distributed,
                feature_dim_first=False,
            )
        )
        self.temperature_q = temperature_q
        self.temperature_k = temperature_k

    def forward_key(self, x: Tensor) -> Tensor:
        """The l2-normalized key projection of ``x`` by the EMA encoder (no gradient)."""
        return F.normalize(self.ema_projection(x), dim=1)

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        q = F.normalize(self.projection_head(self.features(views[0])), dim=1)
        k = self.forward_key(views[1])
        # the queue's content from before this batch's keys are pushed (training mode only)
        _, bank = self.queue(k, update=self.training)
        return relational_loss(q, k, bank.to(q.dtype), self.temperature_q, self.temperature_k)
