"""Self-supervised methods, one small file each, and their registry.

Every method is an :class:`SSLMethod` built on lightly's losses, heads and memory banks, with
the orthogonality regularizer of He, Du & Ma (NeurIPS 2024) on its online backbone::

    method = build_method("byol", backbone, feature_dim=512, regularizer="so", gamma=1e-6)
    out = method.training_loss([view0, view1], progress=step / total_steps)
    out["loss"].backward()          # out["ssl_loss"], out["or_term"] to log

Adding a method: write ``or_core/methods/<name>.py`` with a subclass of :class:`SSLMethod`
(``name``, ``augmentation``, ``default_optimizer``, ``ssl_loss``) and add one line to
:data:`METHODS`.
"""

from __future__ import annotations

from torch import nn

from or_core.methods.barlowtwins import BarlowTwins
from or_core.methods.base import REGULARIZERS, OptimizerDefaults, SSLMethod, cosine_progress
from or_core.methods.byol import BYOL
from or_core.methods.byol_whitening import BYOLWhitening
from or_core.methods.dino import DINO
from or_core.methods.mocov2 import MoCoV2
from or_core.methods.nnclr import NNCLR
from or_core.methods.simclr import SimCLR
from or_core.methods.simsiam import SimSiam
from or_core.methods.swav import SwaV
from or_core.methods.vicreg import VICReg

__all__ = [
    "METHODS",
    "REGULARIZERS",
    "OptimizerDefaults",
    "SSLMethod",
    "available_methods",
    "build_method",
    "cosine_progress",
    "BarlowTwins",
    "BYOL",
    "BYOLWhitening",
    "DINO",
    "MoCoV2",
    "NNCLR",
    "SimCLR",
    "SimSiam",
    "SwaV",
    "VICReg",
]

#: Registry name -> method class.
METHODS: dict[str, type[SSLMethod]] = {
    "barlowtwins": BarlowTwins,
    "byol": BYOL,
    "byol_whitening": BYOLWhitening,
    "dino": DINO,
    "mocov2": MoCoV2,
    "nnclr": NNCLR,
    "simclr": SimCLR,
    "simsiam": SimSiam,
    "swav": SwaV,
    "vicreg": VICReg,
}


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(METHODS)


def method_class(name: str) -> type[SSLMethod]:
    """The class registered under ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the valid names.
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name!r}; valid names are {', '.join(available_methods())}"
        ) from None


def build_method(name: str, backbone: nn.Module, feature_dim: int, **kwargs) -> SSLMethod:
    """Build method ``name`` around ``backbone`` (output dimension ``feature_dim``).

    ``kwargs`` go to the method's constructor: ``regularizer`` (``"none"``, ``"so"``,
    ``"srip"``, ``"dso"``, ``"mc"``), ``gamma``, head sizes (``proj_hidden_dim``,
    ``proj_output_dim``, ...), temperatures, queue sizes.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
        TypeError: an argument the method does not take.
    """
    return method_class(name)(backbone, feature_dim, **kwargs)
