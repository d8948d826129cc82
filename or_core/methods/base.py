"""The base class of the self-supervised methods and the orthogonality switch.

Every method is an ``nn.Module`` that holds the online encoder ``backbone`` and whatever heads,
EMA targets and memory banks the method needs, all built from lightly's pieces. The one thing
this base class adds is the paper's regularizer (He, Du & Ma, NeurIPS 2024):

    loss = ssl_loss + gamma * sum_l OR(W_l)

with ``OR`` summed over the conv and linear weights of the **online backbone only**. Heads
(projector, predictor, prototypes) and EMA targets are never regularized.

One training step, as the training loop drives it::

    out = method.training_loss(views, progress, indices)  # EMA targets first, then the forward
    out["loss"].backward()
    clip_gradients(optimizer)                      # the recipe's clip_grad (DINO's ViT recipe)
    method.on_after_backward(progress)             # e.g. DINO freezes its last layer early on
    schedule_weight_decay(optimizer, progress)     # the recipe's weight_decay_end (DINO's ViT)
    optimizer.step()
    method.on_train_step_end(progress)
    ...                                            # after the epoch's last step:
    method.on_train_epoch_end(epoch)               # DeepCluster V2 re-clusters here

``progress`` is the fraction of training done, in ``[0, 1]`` (``step / total_steps``); EMA
momentum and temperature schedules are functions of it. ``indices`` are the positions of the
batch's images in the training set (only a method that keeps an entry per image reads them).
``method(views, progress, indices)`` is the same as ``method.training_loss(views, progress,
indices)`` so that ``DistributedDataParallel`` can wrap the method.

EMA targets are updated at the start of :meth:`SSLMethod.training_loss`, before the forward
pass, with ``lightly.models.utils.update_momentum`` and the momentum of the current
``progress`` (as lightly's BYOL benchmark and examples do): the target used at step ``t`` has
seen the online weights of step ``t - 1``. The update only happens in training mode.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.backbones import SMALL_IMAGE_SIZE
from or_core.fast_path.host_counters import enqueue_without_host_sync
from or_core.methods.view_recipes import asymmetric_views, base_view, for_image_size
from or_core.orthogonality import PENALTY_KINDS, OrthogonalityRegularizer

#: The online modules that :meth:`SSLMethod.add_ema_targets` gives EMA copies, in this order.
EMA_MODULES: tuple[str, ...] = ("backbone", "projection_head")

__all__ = [
    "REGULARIZERS",
    "OptimizerDefaults",
    "SSLMethod",
    "clip_gradients",
    "cosine_progress",
    "persistent_memory_bank",
    "recipe_key",
    "same_size_groups",
    "schedule_weight_decay",
]

#: Values of the ``regularizer`` switch: no regularization, or one of the penalties.
REGULARIZERS: tuple[str, ...] = ("none", *PENALTY_KINDS)

# Resolution of ``progress`` when it is turned into a step for lightly's cosine_schedule.
_SCHEDULE_STEPS = 1_000_000


def cosine_progress(progress: float, start: float, end: float) -> float:
    """``start`` at ``progress = 0`` to ``end`` at ``progress = 1`` on a half cosine.

    lightly's :func:`~lightly.utils.scheduler.cosine_schedule` with ``progress`` read as step
    ``progress * 10^6`` of ``10^6 + 1``: ``end - (end - start) * (1 + cos(pi * progress)) / 2``.
    """
    step = round(min(max(progress, 0.0), 1.0) * _SCHEDULE_STEPS)
    return cosine_schedule(step, _SCHEDULE_STEPS + 1, start, end)


def persistent_memory_bank(bank: MemoryBankModule) -> MemoryBankModule:
    """Put a lightly memory bank (its ``bank`` and ``bank_ptr``) into ``state_dict``.

    lightly registers both as non-persistent buffers, so a checkpoint would lose MoCo's queue,
    NNCLR's support set and SwaV's queues; re-registering them as persistent buffers lets a
    resumed run continue exactly where it stopped. The bank enqueues through the fast path
    (:func:`or_core.fast_path.host_counters.enqueue_without_host_sync`).
    """
    for name in ("bank", "bank_ptr"):
        bank.register_buffer(name, getattr(bank, name), persistent=True)
    return enqueue_without_host_sync(bank)


def same_size_groups(views: Sequence[Tensor]) -> list[list[Tensor]]:
    """Consecutive views of equal shape, grouped: ``[[global views], [local crops]]``.

    Multi-crop methods concatenate each group into one batch for the backbone.
    """
    groups: list[list[Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape == v.shape:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


@dataclass(frozen=True)
class OptimizerDefaults:
    """The published optimizer recipe of a method: what the training loop builds by default.

    ``lr`` is the base learning rate for a batch of ``batch_size`` images; scale it linearly,
    ``lr * B / batch_size`` (:meth:`scaled_lr`), as solo-learn, lightly's benchmarks and the
    method papers do. The schedule is a linear warmup of ``warmup_epochs`` then a cosine decay.

    The defaults of the fields are those of solo-learn's CIFAR LARS recipes
    (``scripts/pretrain/cifar/*.yaml``: ``eta: 0.02``, ``clip_lr: True``,
    ``exclude_bias_n_norm: True``, momentum 0.9, 10 warmup epochs), which most methods here
    follow. :func:`or_core.train.build_optimizer` and :func:`or_core.train.optimization_step`
    apply every field of the run's recipe (:meth:`SSLMethod.optimizer_defaults`) but
    ``warmup_epochs``, which :func:`or_core.train.build_run` reads from the same recipe (10 in
    every recipe here).

    Attributes:
        name: ``"lars"`` (:class:`or_core.lars.LARS`), ``"sgd"`` or ``"adamw"``.
        lr: base learning rate at ``batch_size``.
        weight_decay: weight decay (the start value when ``weight_decay_end`` is set).
        momentum: SGD/LARS momentum (unused by AdamW).
        batch_size: the batch size ``lr`` refers to.
        warmup_epochs: epochs of linear learning-rate warmup.
        exclude_bias_and_norm: biases and normalization parameters in a parameter group without
            weight decay, and (LARS ``exclude_bias_n_norm``) no LARS adaptation for them; with
            ``False`` every trainable parameter is decayed and adapted.
        trust_coefficient: LARS ``eta`` (solo-learn's CIFAR recipes: 0.02).
        clip_lr: LARS ``clip_lr``: each layer's LARS ratio over the learning rate is capped
            at 1 (solo-learn's CIFAR recipes: on).
        weight_decay_end: end of a cosine weight-decay schedule from ``weight_decay`` over
            training (DINO's ViT recipe), ``None`` if constant.
        clip_grad: each parameter's gradient scaled to at most this norm before the step
            (DINO's ``utils.clip_gradients``), ``None`` for no clipping.
        source: where the numbers come from.
    """

    name: str
    lr: float
    weight_decay: float
    momentum: float = 0.9
    batch_size: int = 256
    warmup_epochs: int = 10
    exclude_bias_and_norm: bool = True
    trust_coefficient: float = 0.02
    clip_lr: bool = True
    weight_decay_end: float | None = None
    clip_grad: float | None = None
    source: str = ""

    def scaled_lr(self, batch_size: int) -> float:
        """``lr * batch_size / self.batch_size`` (the linear scaling rule)."""
        return self.lr * batch_size / self.batch_size

    def to_dict(self) -> dict:
        """The fields as a plain ``dict`` (for configs and run records)."""
        return dataclasses.asdict(self)


def recipe_key(backbone: str, image_size: int | None) -> str:
    """Which of a method's optimizer recipes a run takes (:meth:`SSLMethod.optimizer_defaults`).

    * ``"vit"``: a ViT backbone (DINO's AdamW recipe);
    * ``"cifar"``: ``image_size`` unset (the data's own size: the built-in 32 and 64 px sets)
      or at most 64 px (:data:`or_core.backbones.SMALL_IMAGE_SIZE`, where the ResNet stem and
      the ViT patch change too); the recipe in ``default_optimizer``;
    * ``"imagenet"``: larger images with a ResNet-50, and ``"imagenet-100"`` with another
      ResNet. The libraries pair them so: the ImageNet-1k BYOL recipes of lightly
      (``benchmarks/imagenet/resnet50/byol.py``) and solo-learn
      (``scripts/pretrain/imagenet/byol.yaml``) are for a ResNet-50, solo-learn's ImageNet-100
      recipes (``scripts/pretrain/imagenet-100/*.yaml``) for a ResNet-18. A config field naming
      the recipe would make this choice explicit; ``PretrainConfig`` has none yet.
    """
    name = backbone.lower()
    if name.startswith("vit"):
        return "vit"
    if image_size is None or image_size <= SMALL_IMAGE_SIZE:
        return "cifar"
    return "imagenet" if name == "resnet50" else "imagenet-100"


def schedule_weight_decay(optimizer: torch.optim.Optimizer, progress: float) -> None:
    """Set the weight decay of every parameter group that holds ``weight_decay_start`` and
    ``weight_decay_end`` (put there by :func:`or_core.train.build_optimizer`) to its cosine
    schedule at ``progress``: :func:`cosine_progress`, i.e. DINO's ``utils.cosine_scheduler``,
    ``end + (start - end) * (1 + cos(pi * step / total_steps)) / 2``. Other groups keep theirs."""
    for group in optimizer.param_groups:
        if group.get("weight_decay_end") is not None:
            group["weight_decay"] = cosine_progress(
                progress, group["weight_decay_start"], group["weight_decay_end"]
            )


@torch.no_grad()
def clip_gradients(optimizer: torch.optim.Optimizer) -> None:
    """DINO's gradient clipping (facebookresearch/dino ``utils.clip_gradients``): in every
    parameter group with a ``clip_grad`` value, each gradient ``g`` is multiplied by
    ``min(clip_grad / (||g|| + 1e-6), 1)``, so its norm is at most ``clip_grad``; smaller
    gradients are left as they are. Computed on the device (no host synchronization)."""
    for group in optimizer.param_groups:
        clip = group.get("clip_grad")
        if not clip:
            continue
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            continue
        norms = torch.stack(torch._foreach_norm(grads))
        coefficients = torch.clamp(clip / (norms + 1e-6), max=1.0)
        torch._foreach_mul_(grads, list(coefficients.unbind()))


class SSLMethod(nn.Module):
    """A self-supervised method with the orthogonality regularizer on its online backbone.

    Subclasses build their heads and losses in ``__init__`` and implement :meth:`ssl_loss`.
    Methods with EMA targets set ``base_momentum``/``final_momentum`` and return their
    ``(online, target)`` module pairs from :meth:`momentum_pairs`.

    Class attributes every method declares:
        name: its registry name (a class that declares none is not registered: a base for
            other methods).
        num_global_views: full-resolution views per image (2 for all methods here).
        multi_crop: whether the method takes extra low-resolution local crops after the global
            views; ``num_local_views`` (an instance attribute) says how many by default.
        default_optimizer: the published optimizer recipe at CIFAR scale
            (:class:`OptimizerDefaults`).
        optimizer_recipes: the recipes for other data sets and backbones, by
            :func:`recipe_key` (``"imagenet"``, ``"imagenet-100"``, ``"vit"``); a run whose
            key is not there takes ``default_optimizer`` (:meth:`optimizer_defaults`).

    Class attributes a method may declare:
        aliases: other names :func:`or_core.augment.method_views` accepts for it (``"moco"``).
        profile_settings: config fields by profile name (``{"cpu": {"lr": 0.05}}``), applied
            over that profile's own when a run of this method takes it, and under a YAML file
            and explicit overrides (:func:`or_core.config.resolve_config`).
        uses_sample_indices: whether :meth:`ssl_loss` takes ``indices``, the positions of the
            batch's images in the training set (a method that keeps one entry per image, as
            DeepCluster V2 does); the training loop passes them to every method's
            :meth:`training_loss`, the others ignore them.
        needs_initial_pass: whether the training loop makes a pass over the training set
            before the first step (:meth:`initial_pass_step` for every batch, without
            gradients, then :meth:`end_initial_pass`), as DeepCluster V2 fills its memory.

    and the views it trains on: :meth:`view_recipe` (default: BYOL's two asymmetric views).

    Args:
        backbone: the online encoder, mapping images ``(N, 3, H, W)`` to features
            ``(N, feature_dim)`` (a trailing ``(N, C, 1, 1)`` is flattened).
        feature_dim: the dimension of the backbone's output.
        regularizer: ``"none"`` or an orthogonality penalty, ``"so"``, ``"srip"``, ``"dso"``
            or ``"mc"``.
        gamma: the weight of the penalty; ``None`` takes
            :data:`or_core.orthogonality.DEFAULT_GAMMA`. Ignored when ``regularizer="none"``.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    num_global_views: ClassVar[int] = 2
    multi_crop: ClassVar[bool] = False
    default_optimizer: ClassVar[OptimizerDefaults]
    optimizer_recipes: ClassVar[dict[str, OptimizerDefaults]] = {}
    profile_settings: ClassVar[dict[str, dict[str, Any]]] = {}
    uses_sample_indices: ClassVar[bool] = False
    needs_initial_pass: ClassVar[bool] = False

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
    ) -> None:
        super().__init__()
        if regularizer not in REGULARIZERS:
            raise ValueError(
                f"unknown regularizer {regularizer!r}; valid values are {', '.join(REGULARIZERS)}"
            )
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.regularizer_kind = regularizer
        self.num_local_views = 0
        self.base_momentum: float | None = None
        self.final_momentum: float | None = None
        self.ema_prefix: str | None = None  # set by add_ema_targets
        # Built here, before any head or EMA copy exists: it sees the online backbone only.
        self.regularizer: OrthogonalityRegularizer | None = None
        if regularizer != "none":
            self.regularizer = OrthogonalityRegularizer(backbone, regularizer, gamma)

    # ------------------------------------------------------------------------------------------
    # What subclasses implement
    # ------------------------------------------------------------------------------------------
    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor | dict[str, Tensor]:
        """The method's own loss for a list of views (global views first, then local crops).

        Returns a scalar, or a dict with the scalar under ``"ssl_loss"`` plus extra terms to log.
        """
        raise NotImplementedError

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, EMA target)`` module pairs updated by :meth:`update_targets`: those of
        :meth:`add_ema_targets`, or none."""
        if self.ema_prefix is None:
            return []
        return [(getattr(self, name), getattr(self, f"{self.ema_prefix}_{name}")) for name in EMA_MODULES]

    # ------------------------------------------------------------------------------------------
    # EMA targets (BYOL, MoCo, DINO, ...)
    # ------------------------------------------------------------------------------------------
    def add_ema_targets(
        self, prefix: str, base_momentum: float, final_momentum: float, **given: nn.Module
    ) -> None:
        """EMA targets of the backbone and the projection head, ``<prefix>_backbone`` and
        ``<prefix>_projection_head`` (``target``, ``key``, ``teacher``: each paper's word).

        Each is ``copy.deepcopy`` of its online module, or the module passed under the online
        module's name (DINO's head, whose weight norm cannot be deep-copied), with gradients off.
        :meth:`update_targets` moves them as ``target <- m * target + (1 - m) * online`` with
        ``m`` going from ``base_momentum`` to ``final_momentum`` on a cosine of the progress.
        """
        for name in EMA_MODULES:
            target = given[name] if name in given else copy.deepcopy(getattr(self, name))
            deactivate_requires_grad(target)
            setattr(self, f"{prefix}_{name}", target)
        self.ema_prefix = prefix
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum

    @torch.no_grad()
    def ema_projection(self, x: Tensor) -> Tensor:
        """The projection of ``x`` by the EMA backbone and projection head (no gradient)."""
        (_, backbone), (_, head) = self.momentum_pairs()
        return head(backbone(x).flatten(start_dim=1))

    @classmethod
    def optimizer_defaults(cls, backbone: str, image_size: int | None) -> OptimizerDefaults:
        """The recipe for a run with ``backbone`` on images of ``image_size`` (``None``: the
        data's own size): ``optimizer_recipes[recipe_key(backbone, image_size)]`` where the
        method declares one, else ``default_optimizer``."""
        return cls.optimizer_recipes.get(recipe_key(backbone, image_size), cls.default_optimizer)

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """The method's views made from ``base``, lightly's default view at the image size with
        the data's normalization (:func:`~or_core.methods.view_recipes.base_view`); multi-crop
        methods add ``n_local_views`` local crops after the global views.

        Default: BYOL's two asymmetric views
        (:func:`~or_core.methods.view_recipes.asymmetric_views`).
        """
        return asymmetric_views(base)

    @classmethod
    def views(
        cls,
        image_size: int,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        n_local_views: int = 6,
    ) -> list[ViewConfig]:
        """The views the method trains on, for images of ``image_size``: its
        :meth:`view_recipe`, without Gaussian blur for small images (``image_size <= 64``, as
        lightly's CIFAR-10 benchmarks).

        ``mean``/``std`` normalize the views; by default the CIFAR-10 statistics for small
        images and ImageNet's for larger ones. ``n_local_views`` is the number of local crops
        of a multi-crop method (others take none).

        Raises:
            ValueError: ``image_size`` not positive.
        """
        base = base_view(image_size, mean, std)
        return for_image_size(cls.view_recipe(base, n_local_views), image_size)

    @classmethod
    def sizes_from_state(cls, state: Mapping[str, Tensor]) -> dict[str, Any]:
        """Constructor arguments that the training run set from its data, read back from a saved
        ``state_dict`` (so that a trained method can be rebuilt without its data set); none by
        default."""
        return {}

    def on_after_backward(self, progress: float) -> None:
        """Called after ``backward()`` and before ``optimizer.step()`` (e.g. to drop gradients)."""

    def on_train_step_end(self, progress: float) -> None:
        """Called after ``optimizer.step()``."""

    def on_train_epoch_end(self, epoch: int) -> None:
        """Called after the last step of epoch ``epoch`` (from 0), before its checkpoint."""

    def initial_pass_step(self, views: Sequence[Tensor], indices: Tensor) -> None:
        """One batch of the pass before training (``needs_initial_pass``), without gradients."""

    def end_initial_pass(self) -> None:
        """Called after the pass before training, before the first step."""

    # ------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------
    def training_loss(
        self, views: Sequence[Tensor], progress: float, indices: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``{"loss": ssl_loss + or_term, "ssl_loss": ..., "or_term": ...}`` (+ extra terms).

        In training mode the EMA targets are first moved toward the online networks with the
        momentum of ``progress`` (:meth:`update_targets`). ``indices``, the positions of the
        batch's images in the training set, reach :meth:`ssl_loss` only in a method that
        ``uses_sample_indices``, which needs them.

        Raises:
            ValueError: such a method called without ``indices``, or with a number of them
                other than the views' rows.
        """
        views = self._check_views(views)
        progress = self._check_progress(progress)
        if self.uses_sample_indices:
            if indices is None or indices.shape != views[0].shape[:1]:
                got = "none" if indices is None else f"shape {tuple(indices.shape)}"
                raise ValueError(
                    f"{self.name} needs the positions of the batch's {views[0].shape[0]} images in the "
                    f"training set: training_loss(views, progress, indices=...), got {got}"
                )
        if self.training:
            self.update_targets(progress)
        if self.uses_sample_indices:
            out = self.ssl_loss(views, progress, indices=indices)
        else:
            out = self.ssl_loss(views, progress)
        terms = dict(out) if isinstance(out, dict) else {"ssl_loss": out}
        ssl_loss = terms.pop("ssl_loss")
        or_term = self.or_term().to(ssl_loss.device)
        return {"loss": ssl_loss + or_term, "ssl_loss": ssl_loss, "or_term": or_term, **terms}

    def forward(
        self, views: Sequence[Tensor], progress: float = 0.0, indices: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Same as :meth:`training_loss` (lets ``DistributedDataParallel`` wrap the method)."""
        return self.training_loss(views, progress, indices)

    def or_term(self) -> Tensor:
        """``gamma * sum_l OR(W_l)`` over the online backbone, or a zero tensor when off."""
        if self.regularizer is None:
            first = next(self.backbone.parameters(), None)
            return torch.zeros((), device=first.device if first is not None else None)
        return self.regularizer()

    def features(self, x: Tensor) -> Tensor:
        """The online backbone's representation ``(N, feature_dim)``."""
        return self.backbone(x).flatten(start_dim=1)

    # ------------------------------------------------------------------------------------------
    # EMA targets
    # ------------------------------------------------------------------------------------------
    def momentum(self, progress: float) -> float:
        """EMA momentum at ``progress``: cosine from ``base_momentum`` to ``final_momentum``."""
        if self.base_momentum is None or self.final_momentum is None:
            raise RuntimeError(f"{type(self).__name__} has no EMA target")
        return cosine_progress(progress, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def update_targets(self, progress: float) -> None:
        """``target <- m * target + (1 - m) * online`` for every pair of :meth:`momentum_pairs`."""
        pairs = self.momentum_pairs()
        if not pairs:
            return
        m = self.momentum(progress)
        for online, target in pairs:
            update_momentum(online, target, m=m)

    # ------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------
    def parameter_groups(
        self, weight_decay: float, exclude_bias_and_norm: bool = True
    ) -> list[dict]:
        """Trainable parameters in two optimizer groups: decayed, and biases/norms undecayed
        (lightly's ``get_weight_decay_parameters``); with ``exclude_bias_and_norm=False`` one
        group, all decayed. EMA targets and frozen parameters (``requires_grad=False``) are
        left out.
        """
        if not exclude_bias_and_norm:
            trainable = [p for p in self.parameters() if p.requires_grad]
            return [{"params": trainable, "weight_decay": weight_decay}]
        decay, no_decay = get_weight_decay_parameters([self])
        return [
            {"params": [p for p in decay if p.requires_grad], "weight_decay": weight_decay},
            {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0},
        ]

    def _check_views(self, views: Sequence[Tensor]) -> list[Tensor]:
        views = list(views)
        n_global = self.num_global_views
        if len(views) < n_global or (not self.multi_crop and len(views) != n_global):
            expected = f"{n_global} global views" + (" (+ local crops)" if self.multi_crop else "")
            raise ValueError(f"{type(self).__name__} takes {expected}, got {len(views)} views")
        return views

    @staticmethod
    def _check_progress(progress: float) -> float:
        progress = float(progress)
        if not -1e-6 <= progress <= 1.0 + 1e-6:
            raise ValueError(
                f"progress is the fraction of training done, in [0, 1]; got {progress}"
            )
        return min(max(progress, 0.0), 1.0)

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, regularizer={self.regularizer_kind!r}"
