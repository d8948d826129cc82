"""BYOL + feature whitening: the representation-level baseline of He, Du & Ma (NeurIPS 2024).

He, Du & Ma, "Preventing Dimensional Collapse in Self-Supervised Learning via Orthogonality
Regularization" (NeurIPS 2024), Table 1 and Figure 2, compare BYOL, BYOL + the whitening terms
of VICReg applied to the representation, and BYOL + OR. The whitening terms are those of
Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning" (ICLR 2022), https://arxiv.org/abs/2105.04906.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightly.loss.vicreg_loss import covariance_loss, variance_loss
from torch import Tensor, nn

from or_core.methods.byol import BYOL


class BYOLWhitening(BYOL):
    """BYOL plus VICReg's variance and covariance terms on the backbone output.

    ``loss = byol + variance_weight * (v(h0) + v(h1)) / 2 + covariance_weight * (c(h0) + c(h1))``

    where ``h0, h1`` are the online backbone's representations of the two views (not the
    projections) and ``v``, ``c`` are lightly's ``variance_loss`` (hinge on the per-dimension
    standard deviation, target 1) and ``covariance_loss`` (squared off-diagonal covariance over
    the dimension), combined as in ``lightly.loss.VICRegLoss``. The terms reach the backbone
    only: the projector, predictor and target are trained exactly as in :class:`BYOL`.

    Defaults (the weights are this library's choice; the paper does not give its own): VICReg's
    ratio invariance : variance : covariance = 25 : 25 : 1, with BYOL's loss in the role of the
    invariance term at weight 1, hence variance 1.0 and covariance 0.04. BYOL's loss per
    direction, ``2 - 2 cos``, is on the scale of VICReg's MSE between standardized embeddings,
    so the ratio carries over. Everything else (heads, momentum, optimizer) is :class:`BYOL`'s.

    Args:
        variance_weight, covariance_weight: weights of the two terms.
        eps: the epsilon inside the variance term's square root (VICReg's 1e-4).
        **kwargs: :class:`BYOL`'s arguments.
    """

    name = "byol_whitening"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        variance_weight: float = 1.0,
        covariance_weight: float = 0.04,
        eps: float = 1e-4,
        **kwargs,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma, **kwargs)
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.eps = eps

    def whitening_terms(self, h0: Tensor, h1: Tensor) -> tuple[Tensor, Tensor]:
        """VICReg's ``(variance, covariance)`` terms of two batches of representations."""
        variance = 0.5 * (variance_loss(h0, eps=self.eps) + variance_loss(h1, eps=self.eps))
        covariance = covariance_loss(h0) + covariance_loss(h1)
        return variance, covariance

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> dict[str, Tensor]:
        byol, (h0, h1) = self.byol_loss(views)
        variance, covariance = self.whitening_terms(h0, h1)
        loss = byol + self.variance_weight * variance + self.covariance_weight * covariance
        return {
            "ssl_loss": loss,
            "byol_loss": byol.detach(),
            "variance_loss": variance.detach(),
            "covariance_loss": covariance.detach(),
        }
