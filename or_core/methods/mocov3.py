"""MoCo v3: Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision Transformers"
(ICCV 2021), https://arxiv.org/abs/2104.02057.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead
from lightly.utils import dist
from torch import Tensor, nn

from or_core.methods.base import OptimizerDefaults, SSLMethod

__all__ = ["MoCoV3", "info_nce"]


def info_nce(
    query: Tensor, key: Tensor, temperature: float, gather_distributed: bool = False
) -> Tensor:
    """The one-directional InfoNCE loss of a batch of queries against the batch's keys:

        InfoNCE(q, k) = -mean_i log( exp(q_i . k_i / tau) / sum_j exp(q_i . k_j / tau) )
                      = CE(q_hat k_hat^T / tau, labels = diag)

    with ``q_hat``, ``k_hat`` the l2-normalized rows: the negatives of ``q_i`` are the keys of
    the other images (of every process with ``gather_distributed``: the keys are gathered with
    lightly's ``dist.gather``, which keeps their gradient). MoCo v3's ``ctr(q, k)`` is
    ``2 * tau * InfoNCE(q, k)``; NNCLR's paper loss is ``InfoNCE(NN(z), p)``.

    lightly's ``NTXentLoss`` is SimCLR's form (negatives from both views, both directions), not
    this one, hence the few lines here.
    """
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    labels = torch.arange(q.shape[0], device=q.device)
    if gather_distributed and dist.world_size() > 1:
        k = torch.cat(dist.gather(k))
        labels = labels + dist.rank() * q.shape[0]
    return F.cross_entropy(q @ k.t() / temperature, labels)


class MoCoV3(SSLMethod):
    """MoCo v3: the online encoder (backbone, projector, predictor) contrasts the prediction of
    each view with the keys of the other view from an EMA key encoder (backbone, projector),
    the other images of the batch serving as negatives; no queue.

        loss = ctr(p0, k1) + ctr(p1, k0),   ctr(q, k) = 2 * tau * InfoNCE(q, k)

    (the paper's Algorithm 1) with :func:`info_nce` at temperature ``tau``; the factor ``2 * tau``
    makes the gradient's scale independent of ``tau``. The key encoder
    is ``copy.deepcopy`` of the online backbone and projector with gradients off, moved by
    ``update_momentum`` with a momentum going from ``base_momentum`` to ``final_momentum`` on a
    cosine of ``progress``.

    Heads (the paper's ResNet heads): projector lightly's ``MoCoProjectionHead`` with
    ``num_layers=2, batch_norm=True`` (linear, BN, ReLU, linear, BN; the MoCo v3 code's last BN
    has no affine parameters, lightly's has), predictor lightly's ``BYOLPredictionHead``
    (linear, BN, ReLU, linear: MoCo v3's ResNet predictor, no BN on its output).

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/mocov3.yaml``):
    projector 4096 -> 256, predictor hidden 4096, temperature 0.2, tau 0.99 -> 1.0, LARS lr 0.3
    (batch 256), weight decay 1e-6, eta 0.02, clip_lr, asymmetric augmentations
    (``augmentations/asymmetric.yaml``: BYOL's views, :meth:`SSLMethod.view_recipe`'s default).

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        pred_hidden_dim: predictor hidden size (its output is ``proj_output_dim``).
        temperature: ``tau`` of :func:`info_nce`.
        base_momentum, final_momentum: EMA momentum at the start and the end of training.
        gather_distributed: under DDP, the keys of all processes are the negatives.
    """

    name = "mocov3"
    # solo-learn scripts/pretrain/cifar/mocov3.yaml: lars, batch_size 256, lr 0.3,
    # weight_decay 1e-6, eta 0.02, clip_lr True, exclude_bias_n_norm True.
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.3,
        weight_decay=1e-6,
        source="solo-learn scripts/pretrain/cifar/mocov3.yaml (ResNet-18, batch 256)",
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
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = MoCoProjectionHead(
            feature_dim, proj_hidden_dim, proj_output_dim, num_layers=2, batch_norm=True
        )
        self.prediction_head = BYOLPredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.add_ema_targets("key", base_momentum, final_momentum)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward_key(self, x: Tensor) -> Tensor:
        """The key projection of ``x`` by the EMA encoder (no gradient)."""
        return self.ema_projection(x)

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        p0, p1 = (self.prediction_head(self.projection_head(self.features(v))) for v in views)
        k0, k1 = (self.forward_key(v) for v in views)
        tau, gather = self.temperature, self.gather_distributed
        return 2 * tau * (info_nce(p0, k1, tau, gather) + info_nce(p1, k0, tau, gather))
