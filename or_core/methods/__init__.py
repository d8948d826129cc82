"""Self-supervised methods, one small file each, and their registry.

Every method is an :class:`SSLMethod` built on lightly's losses, heads and memory banks, with
the orthogonality regularizer of He, Du & Ma (NeurIPS 2024) on its online backbone::

    method = build_method("byol", backbone, feature_dim=512, regularizer="so", gamma=1e-6)
    out = method.training_loss([view0, view1], progress=step / total_steps)
    out["loss"].backward()          # out["ssl_loss"], out["or_term"] to log

Adding a method is one new file, ``or_core/methods/<name>.py``, and no edit anywhere else. In
it, a subclass of :class:`SSLMethod` declares

* ``name``: its registry name, the value of ``--method`` and of a config's ``method``;
* ``default_optimizer``: its published recipe (:class:`OptimizerDefaults`), and optionally
  ``optimizer_recipes`` for other data sets and backbones;
* ``__init__(backbone, feature_dim, regularizer="none", gamma=None, proj_hidden_dim=...,
  proj_output_dim=..., ...)`` (the cpu and ci profiles set those two sizes for every method),
  calling ``super().__init__(backbone, feature_dim, regularizer, gamma)`` before building its
  heads (the regularizer must see the online backbone only), and :meth:`SSLMethod.ssl_loss`;

and where the defaults do not fit:

* :meth:`SSLMethod.view_recipe`, the views it trains on (default: BYOL's two asymmetric
  views; :mod:`or_core.methods.view_recipes` has lightly's other recipes and their pieces),
  with ``multi_crop = True`` if it takes local crops after the global views;
* ``profile_settings``, config fields by profile (``{"cpu": {"lr": 0.05}}``);
* :meth:`SSLMethod.add_ema_targets` in ``__init__`` for EMA copies of the backbone and the
  projection head (:meth:`SSLMethod.ema_projection` runs them), :meth:`SSLMethod.on_after_backward`
  to drop gradients;
* ``aliases``, other names :func:`or_core.augment.method_views` accepts.

:func:`discover_methods` imports every module of this package when it is first imported and
registers every class defined there that declares a ``name``; the command line
(``python -m or_core pretrain --help`` lists it), configs, matrices, campaigns and the book
then know the method, and the tests train it with every other registered method
(``tests/test_methods.py``, ``tests/test_train.py``, heads narrowed through
``proj_hidden_dim``/``proj_output_dim``, which every method takes).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

from torch import nn

from or_core.methods.base import REGULARIZERS, OptimizerDefaults, SSLMethod, cosine_progress

__all__ = [
    "METHODS",
    "REGULARIZERS",
    "OptimizerDefaults",
    "SSLMethod",
    "available_methods",
    "build_method",
    "cosine_progress",
    "discover_methods",
    "find_method",
    "method_class",
]

#: Registry name -> method class, filled by :func:`discover_methods`.
METHODS: dict[str, type[SSLMethod]] = {}


def _loose(name: str) -> str:
    """``name`` compared loosely: lower case, without ``-``, ``_`` and spaces."""
    return re.sub(r"[-_ ]", "", name.lower())


def _declared_methods(module: ModuleType) -> list[type[SSLMethod]]:
    """The method classes ``module`` defines that declare their own ``name``."""
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, SSLMethod)
        and obj.__module__ == module.__name__
        and obj.__dict__.get("name")
    ]


def _register(cls: type[SSLMethod]) -> None:
    """Put ``cls`` into :data:`METHODS` under its ``name``.

    Raises:
        TypeError: its name or one of its aliases is, loosely compared, another method's.
    """
    names = {_loose(n) for n in (cls.name, *cls.aliases)}
    for other in METHODS.values():
        same = other is cls or (
            other.__module__ == cls.__module__ and other.__qualname__ == cls.__qualname__
        )
        if not same and names & {_loose(n) for n in (other.name, *other.aliases)}:
            raise TypeError(
                f"method {cls.__module__}.{cls.__qualname__} takes the name {cls.name!r} or an "
                f"alias of {other.__module__}.{other.__qualname__} ({other.name!r}): rename one"
            )
    METHODS[cls.name] = cls


def discover_methods() -> dict[str, type[SSLMethod]]:
    """Import every module of this package (every folder on its ``__path__``) and register the
    :class:`SSLMethod` subclasses defined there that declare a ``name``; returns
    :data:`METHODS`.

    Runs when the package is first imported; call it again to see a module added since (a
    module already imported is not imported again).
    """
    for info in pkgutil.iter_modules(__path__, prefix=f"{__name__}."):
        module = importlib.import_module(info.name)
        for cls in _declared_methods(module):
            _register(cls)
    return METHODS


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


def find_method(name: str) -> type[SSLMethod]:
    """The method called ``name`` or one of its ``aliases``, compared loosely (case, ``-``,
    ``_`` and spaces ignored: ``"MoCo-v2"`` is ``mocov2``).

    Raises:
        ValueError: no such method; the message lists the valid names.
    """
    key = _loose(name) if isinstance(name, str) else None
    for cls in METHODS.values():
        if key in {_loose(n) for n in (cls.name, *cls.aliases)}:
            return cls
    valid = sorted({n for cls in METHODS.values() for n in (cls.name, *cls.aliases)})
    raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(valid)}")


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


discover_methods()
