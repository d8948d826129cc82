"""W-MSE: Ermolov, Siarohin, Sangineto & Sebe, "Whitening for Self-Supervised Representation
Learning" (ICML 2021), https://arxiv.org/abs/2007.06346.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from lightly.loss import WMSELoss
from lightly.models.modules import BYOLProjectionHead
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod


class WMSE(SSLMethod):
    """W-MSE: the projections of the two views are whitened together in sub-batches, then pulled
    together by the normalized MSE:

        W = Cholesky(Cov(z))^-1 over a sub-batch of ``whitening_size`` images (both views
            whitened with the same W, computed on each view's rows in turn),
        loss = mean over the ``whitening_iters`` random splits of 2 - 2 cos(W z0_i, W z1_i)

    (lightly's ``WMSELoss`` with its ``Whitening2d``, ``num_samples=2``). Whitening makes the
    projection's covariance the identity, so the embedding cannot collapse without a negative
    pair. The batch size must be a multiple of ``whitening_size`` and ``whitening_size`` at least
    ``2 * proj_output_dim`` (lightly's condition for a well-conditioned covariance). The loss
    is computed in float32 (a Cholesky factorization in bfloat16 is not accurate enough).

    Projector: lightly's ``BYOLProjectionHead`` (linear, BN, ReLU, linear), solo-learn's W-MSE
    projector.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/wmse.yaml``):
    projector 1024 -> 64, whitening size 128, 1 whitening iteration, eps 0 (the last two are
    ``solo/methods/wmse.py``'s defaults, which the recipe leaves), Adam lr 2e-3 (batch 256),
    weight decay 1e-6 on every parameter. Adam's L2 decay is replaced by AdamW's decoupled one
    (this package's optimizers are LARS, SGD and AdamW), and biases and norms are not decayed:
    at 1e-6 the differences are negligible. Views
    (:meth:`view_recipe`): lightly's ``WMSETransform``, the W-MSE paper's; solo-learn's recipe
    jitters harder (0.8/0.8/0.8/0.2, gray 0.2).

    The profiles with batches of 64 or 128 images (:attr:`profile_settings`) shrink the
    projection and the whitening sub-batch to fit them.

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        whitening_size: images per whitened sub-batch.
        whitening_iters: random splits into sub-batches per step.
        whitening_eps: shrinkage of the covariance towards the identity.
    """

    name = "wmse"
    # solo-learn scripts/pretrain/cifar/wmse.yaml: adam, batch_size 256, lr 2e-3,
    # weight_decay 1e-6 (on every parameter there; biases and norms are left undecayed here, as
    # in every recipe of this package: at 1e-6 the difference is immaterial).
    default_optimizer = OptimizerDefaults(
        name="adamw",
        lr=2e-3,
        weight_decay=1e-6,
        source="solo-learn scripts/pretrain/cifar/wmse.yaml (ResNet-18, batch 256; Adam there)",
    )
    # The cpu and ci profiles set a 256- or 128-wide projection for every method, and lightly's
    # WMSELoss needs a whitening sub-batch of at least twice that, within the batch: at their
    # batch sizes (64; 128) the recipe's ratio (64 dimensions whitened over 128 images) is
    # kept by halving both where the batch is 64.
    profile_settings = {
        "cpu": {"method_kwargs": {"proj_output_dim": 32, "whitening_size": 64}},
        "cpu_small": {"method_kwargs": {"proj_output_dim": 64, "whitening_size": 128}},
        "ci": {"method_kwargs": {"proj_output_dim": 64, "whitening_size": 128}},
    }

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """lightly's ``WMSETransform``: two equal views, jitter 0.4/0.4/0.4/0.1 with prob 0.8,
        gray 0.1, bicubic crops at scale (0.2, 1), blur 0.5 (off at 32 px)."""
        view = replace(
            base,
            cj_bright=0.4,
            cj_contrast=0.4,
            cj_sat=0.4,
            cj_hue=0.1,
            gray_prob=0.1,
            min_scale=0.2,
            blur_prob=0.5,
            interpolation="bicubic",
        )
        return [view] * 2

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 1024,
        proj_output_dim: int = 64,
        whitening_size: int = 128,
        whitening_iters: int = 1,
        whitening_eps: float = 0.0,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = BYOLProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.criterion = WMSELoss(
            embedding_dim=proj_output_dim,
            w_size=whitening_size,
            w_iter=whitening_iters,
            eps=whitening_eps,
            num_samples=2,
        )
        self.whitening_size = whitening_size

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        n = views[0].shape[0]
        if n % self.whitening_size:
            raise ValueError(
                f"W-MSE whitens sub-batches of whitening_size={self.whitening_size} images: the "
                f"batch of {n} is not a multiple of it; set method_kwargs.whitening_size (at "
                f"least twice proj_output_dim)"
            )
        z = torch.cat([self.projection_head(self.features(v)) for v in views])
        with torch.autocast(z.device.type, enabled=False):
            return self.criterion(z.float())
