"""BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"
(NeurIPS 2020), https://arxiv.org/abs/2006.07733.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
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
    decay 1e-5, eta 0.02, clip_lr, asymmetric augmentations. Heads are lightly's
    ``BYOLProjectionHead`` and ``BYOLPredictionHead`` (the BYOL paper's sizes).

    ImageNet-scale recipes (:attr:`optimizer_recipes`, chosen by
    :func:`~or_core.methods.base.recipe_key`): ImageNet-1k with a ResNet-50, LARS lr
    0.45 x B/256, weight decay 1e-6, eta 0.001, no clip_lr, as both lightly's
    ``benchmarks/imagenet/resnet50/byol.py`` and solo-learn's
    ``scripts/pretrain/imagenet/byol.yaml`` set it; ImageNet-100 with a ResNet-18, solo-learn's
    ``scripts/pretrain/imagenet-100/byol.yaml``: LARS lr 0.5 x B/256, weight decay 1e-6, eta
    0.02, clip_lr (that recipe's predictor is 8192 wide: pass ``pred_hidden_dim=8192``).

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        pred_hidden_dim: predictor hidden size (its output is ``proj_output_dim``).
        base_momentum, final_momentum: EMA momentum at the start and the end of training.
    """

    name = "byol"
    # solo-learn scripts/pretrain/cifar/byol.yaml: lars, batch_size 256, lr 1.0, weight_decay 1e-5,
    # eta 0.02, clip_lr True, exclude_bias_n_norm True (the OptimizerDefaults defaults).
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=1.0,
        weight_decay=1e-5,
        source="solo-learn scripts/pretrain/cifar/byol.yaml (ResNet-18, batch 256)",
    )
    optimizer_recipes = {
        # lightly benchmarks/imagenet/resnet50/byol.py: LARS(lr=0.45 * batch_size / 256,
        # momentum=0.9, weight_decay=1e-6), lightly's default trust_coefficient 0.001, no weight
        # decay for biases and norms, 10 warmup epochs. solo-learn
        # scripts/pretrain/imagenet/byol.yaml agrees: lr 0.45 (scaled by batch / 256,
        # solo/args/pretrain.py), weight_decay 1e-6, eta 0.001, clip_lr False,
        # exclude_bias_n_norm True.
        "imagenet": OptimizerDefaults(
            name="lars",
            lr=0.45,
            weight_decay=1e-6,
            trust_coefficient=0.001,
            clip_lr=False,
            source="lightly benchmarks/imagenet/resnet50/byol.py and solo-learn "
            "scripts/pretrain/imagenet/byol.yaml (ResNet-50, lr 0.45 x B/256)",
        ),
        # solo-learn scripts/pretrain/imagenet-100/byol.yaml: lr 0.5 at batch_size 128 on 2 devices
        # (x 128 * 2 / 256 = 0.5 at batch 256), weight_decay 1e-6, eta 0.02, clip_lr True,
        # exclude_bias_n_norm True.
        "imagenet-100": OptimizerDefaults(
            name="lars",
            lr=0.5,
            weight_decay=1e-6,
            source="solo-learn scripts/pretrain/imagenet-100/byol.yaml (ResNet-18, lr 0.5 x B/256)",
        ),
    }

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
        self.add_ema_targets("target", base_momentum, final_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward_target(self, x: Tensor) -> Tensor:
        """The target projection of ``x`` (no gradient)."""
        return self.ema_projection(x)

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
