"""The pieces the methods' view recipes share: lightly 1.6's transform defaults as
:class:`~or_core.augment.ViewConfig` values.

A method's views are its :meth:`~or_core.methods.base.SSLMethod.views`: a base view at the image
size with the data's normalization (:func:`base_view`), turned into the method's list of views
by its :meth:`~or_core.methods.base.SSLMethod.view_recipe` from the helpers here, then adapted to
small images (:func:`for_image_size`). Every view flips with prob 0.5 and crops with aspect
ratio (3/4, 4/3), lightly's defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from or_core.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewConfig,
)

__all__ = [
    "HALF_JITTER",
    "MOCO_JITTER",
    "SIMCLR_JITTER",
    "SMALL_VIEW_SIZE",
    "asymmetric_views",
    "base_view",
    "for_image_size",
    "local_size",
    "moco_views",
    "simclr_views",
]

#: Images up to this side are CIFAR-like: no blur, CIFAR-10 statistics by default.
SMALL_VIEW_SIZE = 64

#: SimCLR's colour-jitter strengths (lightly's ``SimCLRTransform``: cj_strength 1 times
#: brightness, contrast, saturation 0.8 and hue 0.2).
SIMCLR_JITTER: dict[str, Any] = dict(cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8, cj_hue=0.2)
#: MoCo v2's and SimSiam's (lightly's ``MoCoV2Transform`` and ``SimSiamTransform``).
MOCO_JITTER: dict[str, Any] = dict(cj_bright=0.4, cj_contrast=0.4, cj_sat=0.4, cj_hue=0.1)
#: lightly's ``cj_strength=0.5`` times its (0.8, 0.8, 0.4, 0.2) defaults: BYOL's, VICReg's, DINO's.
HALF_JITTER: dict[str, Any] = dict(cj_bright=0.4, cj_contrast=0.4, cj_sat=0.2, cj_hue=0.1)


def _statistics(values: Sequence[float]) -> tuple[float, float, float]:
    """Three per-channel numbers (a mean or a standard deviation) as a tuple of floats."""
    if len(values) != 3:
        raise ValueError(f"mean and std need 3 entries (one per channel), got {tuple(values)}")
    return float(values[0]), float(values[1]), float(values[2])


def base_view(
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ViewConfig:
    """lightly's default view at ``image_size``, normalized with ``mean`` and ``std``.

    Defaults: the CIFAR-10 statistics for small images (``image_size <= 64``; lightly's own
    CIFAR script keeps ImageNet's, a fixed affine map that batch norm absorbs), ImageNet's for
    larger ones.

    Raises:
        ValueError: ``image_size`` not positive.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    small = image_size <= SMALL_VIEW_SIZE
    mean = (CIFAR10_MEAN if small else IMAGENET_MEAN) if mean is None else mean
    std = (CIFAR10_STD if small else IMAGENET_STD) if std is None else std
    return ViewConfig(size=image_size, mean=_statistics(mean), std=_statistics(std))


def for_image_size(views: Sequence[ViewConfig], image_size: int) -> list[ViewConfig]:
    """``views`` for images of ``image_size``: as in lightly's CIFAR-10 benchmarks, small images
    (``image_size <= 64``) get no Gaussian blur (prob 0 in every view)."""
    if image_size <= SMALL_VIEW_SIZE:
        return [replace(v, blur_prob=0.0) for v in views]
    return list(views)


def local_size(image_size: int, global_ref: int = 224, local_ref: int = 96) -> int:
    """Small multi-crop size scaled like lightly's 96 px for 224 px (to a multiple of 8).

    224 -> 96, 128 -> 56, 96 -> 40, 64 -> 24, 32 -> 16 (at least 8 px).
    """
    return max(8, 8 * round(image_size * local_ref / global_ref / 8))


def asymmetric_views(base: ViewConfig) -> list[ViewConfig]:
    """BYOL's two asymmetric views (lightly's ``BYOLTransform``): jitter 0.4/0.4/0.2/0.1 with
    prob 0.8, gray 0.2, scale (0.08, 1); view 1 blur 1.0 and no solarization, view 2 blur 0.1 and
    solarization 0.2."""
    return [
        replace(base, **HALF_JITTER, blur_prob=1.0, solarize_prob=0.0),
        replace(base, **HALF_JITTER, blur_prob=0.1, solarize_prob=0.2),
    ]


def simclr_views(base: ViewConfig) -> list[ViewConfig]:
    """SimCLR's two equal views (lightly's ``SimCLRTransform``): jitter 0.8/0.8/0.8/0.2 with prob
    0.8, gray 0.2, blur 0.5, scale (0.08, 1)."""
    return [replace(base, **SIMCLR_JITTER, blur_prob=0.5)] * 2


def moco_views(base: ViewConfig) -> list[ViewConfig]:
    """MoCo v2's two equal views (lightly's ``MoCoV2Transform``; ``SimSiamTransform`` is the
    same): jitter 0.4/0.4/0.4/0.1 with prob 0.8, gray 0.2, blur 0.5, scale (0.2, 1)."""
    return [replace(base, **MOCO_JITTER, min_scale=0.2, blur_prob=0.5)] * 2
