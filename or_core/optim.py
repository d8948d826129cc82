"""Optimization recipe of a run: the optimizer (LARS, SGD or AdamW) and its learning-rate
schedule, built from the method's published recipe and the config's overrides.

The per-step parts of a recipe that live in the optimizer's parameter groups (a weight-decay
schedule, gradient clipping) are applied by :func:`schedule_weight_decay` and
:func:`clip_gradients` (from :mod:`or_core.methods.base`), called by the training step.
"""

from __future__ import annotations

import torch
from lightly.utils.scheduler import CosineWarmupScheduler

from or_core.config import PretrainConfig
from or_core.lars import LARS
from or_core.methods import SSLMethod
from or_core.methods.base import clip_gradients, schedule_weight_decay

__all__ = ["OPTIMIZERS", "build_optimizer", "build_scheduler", "clip_gradients", "schedule_weight_decay"]

#: The optimizers a config may name.
OPTIMIZERS = ("lars", "sgd", "adamw")


def build_optimizer(method: SSLMethod, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """The method's published optimizer (LARS, SGD or AdamW), with the config's overrides.

    The recipe is the method's for the run's backbone and image size
    (:meth:`~or_core.methods.base.SSLMethod.optimizer_defaults`: CIFAR, ImageNet-100,
    ImageNet-1k or ViT). The learning rate follows the linear scaling rule,
    ``lr * batch_size / recipe.batch_size``, unless ``cfg.lr`` is given. With the recipe's
    ``exclude_bias_and_norm`` biases and normalization parameters get no weight decay (and no
    LARS adaptation). LARS takes the recipe's trust coefficient and ``clip_lr``. A recipe's
    weight-decay schedule (``weight_decay_end``; only when ``cfg.weight_decay`` is not given,
    which makes the weight decay constant) and gradient clipping (``clip_grad``) are written
    into the parameter groups, saved with the optimizer's state, and applied each step by
    :func:`schedule_weight_decay` and :func:`clip_gradients`.
    """
    defaults = method.optimizer_defaults(cfg.backbone, cfg.image_size)
    name = cfg.optimizer or defaults.name
    lr = cfg.lr if cfg.lr is not None else defaults.scaled_lr(cfg.batch_size)
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else defaults.weight_decay
    groups = method.parameter_groups(weight_decay, exclude_bias_and_norm=defaults.exclude_bias_and_norm)
    for group in groups:
        if cfg.weight_decay is None and defaults.weight_decay_end is not None and group["weight_decay"] != 0:
            group.update(weight_decay_start=weight_decay, weight_decay_end=defaults.weight_decay_end)
        if defaults.clip_grad is not None:
            group["clip_grad"] = defaults.clip_grad
    if name == "lars":
        return LARS(
            groups, lr=lr, momentum=defaults.momentum, trust_coefficient=defaults.trust_coefficient,
            clip_lr=defaults.clip_lr, exclude_bias_n_norm=defaults.exclude_bias_and_norm,
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=defaults.momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, method: SSLMethod, cfg: PretrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then cosine decay, stepped once per optimization step.

    The warm-up lasts ``cfg.warmup_epochs`` (default: the method's recipe), at most half of
    the run: ``min(warmup_epochs, epochs // 2) * steps_per_epoch`` steps of
    ``epochs * steps_per_epoch``.
    """
    total_steps = cfg.epochs * steps_per_epoch
    recipe = method.optimizer_defaults(cfg.backbone, cfg.image_size)  # as build_optimizer's
    warmup_epochs = cfg.warmup_epochs if cfg.warmup_epochs is not None else recipe.warmup_epochs
    warmup_steps = min(warmup_epochs, cfg.epochs // 2) * steps_per_epoch
    return CosineWarmupScheduler(optimizer, warmup_epochs=warmup_steps, max_epochs=total_steps)
