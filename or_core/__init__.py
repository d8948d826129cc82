"""or_core: orthogonality regularization against dimensional collapse in self-supervised learning.

A companion to He, Du & Ma, "Preventing Dimensional Collapse in Self-Supervised Learning via
Orthogonality Regularization" (NeurIPS 2024).
"""

from or_core.diagnostics import (
    covariance_eigenvalues,
    effective_rank,
    feature_spectra,
    features,
    normalized_spectrum,
    orthogonality_error,
    rankme,
    std_of_l2_normalized,
    weight_spectra,
)
from or_core.orthogonality import (
    DEFAULT_GAMMA,
    PENALTY_KINDS,
    OrthogonalityRegularizer,
    dso_penalty,
    matrix_view,
    mc_penalty,
    regularized_weights,
    smaller_side_gram,
    so_diag_penalty,
    so_offdiag_penalty,
    so_penalty,
    srip_penalty,
)

__version__ = "0.1.0"

__all__ = [
    "covariance_eigenvalues",
    "effective_rank",
    "feature_spectra",
    "features",
    "normalized_spectrum",
    "orthogonality_error",
    "rankme",
    "std_of_l2_normalized",
    "weight_spectra",
    "DEFAULT_GAMMA",
    "PENALTY_KINDS",
    "OrthogonalityRegularizer",
    "dso_penalty",
    "matrix_view",
    "mc_penalty",
    "regularized_weights",
    "smaller_side_gram",
    "so_diag_penalty",
    "so_offdiag_penalty",
    "so_penalty",
    "srip_penalty",
]
