"""DINO: Caron, Touvron, Misra, Jegou, Mairal, Bojanowski & Joulin, "Emerging Properties in
Self-Supervised Vision Transformers" (ICCV 2021), https://arxiv.org/abs/2104.14294.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod, same_size_groups
from or_core.methods.view_recipes import HALF_JITTER, local_size


class DINO(SSLMethod):
    """DINO: self-distillation with no labels. A student (the online backbone + DINO head) matches,
    by cross-entropy, the centered and sharpened softmax of an EMA teacher.

    Multi-crop: ``views`` are the 2 global views followed by any number of local crops. The
    teacher sees the global views only; the student sees all views (same-sized views are
    concatenated into one batch). Each student view is matched to every teacher view but its
    own (lightly's ``DINOLoss``, which also keeps the teacher's center, momentum
    ``center_momentum``).

    Head: lightly's ``DINOProjectionHead`` (3-layer MLP with GELU, l2-normalized bottleneck,
    weight-normalized last layer). The teacher is a copy of the student's backbone
    (``copy.deepcopy``) and head (a fresh head loaded with the student's state: the head's
    weight norm cannot be deep-copied), gradients off, moved by ``update_momentum``.
    Schedules of ``progress``: the EMA momentum goes from ``base_momentum`` to ``final_momentum``
    on a cosine; the teacher temperature rises linearly from ``warmup_teacher_temp`` to
    ``teacher_temp`` during the first ``warmup_teacher_temp_progress`` of training, as in DINO.
    The last layer's gradients are dropped during the first ``freeze_last_layer_progress`` of
    training (:meth:`on_after_backward`; DINO freezes it for the first epoch).

    Defaults: solo-learn's CIFAR ResNet-18 recipe, all from one source
    (``scripts/pretrain/cifar/dino.yaml`` and the defaults of ``solo/methods/dino.py`` and
    ``solo/losses/dino.py`` that it leaves): two 32 px crops and no local crops
    (``augmentations: asymmetric.yaml``, ``num_crops: 1`` twice), head hidden 2048, bottleneck
    256, 4096 prototypes, no batch norm in the head, normalized last layer, tau 0.9995 -> 1.0,
    student temperature 0.1, teacher temperature 0.07 from the start (the yaml sets no
    ``warmup_teacher_temperature_epochs``: default 0), center momentum 0.9, last layer frozen
    1 of 1000 epochs (0.001), LARS lr 0.3 (batch 256), weight decay 1e-6, eta 0.02, clip_lr, no
    gradient clipping (``clip_grad`` default 0) and a constant weight decay.

    For a ViT, ``optimizer_recipes["vit"]`` is DINO's AdamW recipe (facebookresearch/dino
    ``main_dino.py`` defaults): lr 5e-4 x B/256, weight decay 0.04 -> 0.4 on a cosine over
    training, each parameter's gradient clipped to norm 3.0, 10 warmup epochs; the head and
    multi-crop settings that go with it are in ``configs/cifar100_vit_dino.yaml``.

    The views (:meth:`view_recipe`) are lightly's ``DINOTransform``, whose global crops keep
    DINO's multi-crop scale (0.4, 1) with or without local crops; solo-learn's
    ``asymmetric.yaml`` crops (0.08, 1) (and DINO's ``main_dino.py`` advises (0.14, 1) without
    local crops).

    The cpu profile (800 steps of a width-0.125 ResNet-18) replaces several of these defaults
    (:attr:`profile_settings`): with them the loss never left ``ln K``.

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim: head hidden size.
        proj_output_dim: head bottleneck size (before the prototypes).
        num_prototypes: output size of the head (``K``).
        batch_norm: batch norm in the head (off for ViTs; off in solo-learn's ResNet recipe).
        norm_last_layer: fix the weight-norm scale of the last layer to 1.
        student_temp, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_progress:
            temperatures and the teacher-temperature warmup (fraction of training).
        center_momentum: momentum of the teacher's center.
        base_momentum, final_momentum: EMA momentum at the start and the end of training.
        freeze_last_layer_progress: fraction of training during which the head's last layer
            gets no update.
        num_local_views: local crops the augmentation should make (the method takes any number).
    """

    name = "dino"
    multi_crop = True
    # solo-learn scripts/pretrain/cifar/dino.yaml: lars, batch_size 256, lr 0.3, weight_decay 1e-6,
    # eta 0.02, clip_lr True, exclude_bias_n_norm True; no clip_grad (solo/methods/dino.py: 0) and
    # no weight-decay schedule. (DINO's own ResNet-50 recipe, facebookresearch/dino README, is
    # SGD lr 0.03, weight decay 1e-4 constant, clip_grad 3.0 by default; not used here.)
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.3,
        weight_decay=1e-6,
        source="solo-learn scripts/pretrain/cifar/dino.yaml (ResNet-18, batch 256)",
    )
    # facebookresearch/dino main_dino.py defaults: --optimizer adamw, --lr 0.0005 (scaled by
    # batch / 256), --warmup_epochs 10, --weight_decay 0.04, --weight_decay_end 0.4 (cosine
    # utils.cosine_scheduler, on the regularized group only), --clip_grad 3.0 (utils.clip_gradients,
    # per parameter); biases and 1-D parameters not regularized (utils.get_params_groups).
    optimizer_recipes = {
        "vit": OptimizerDefaults(
            name="adamw",
            lr=5e-4,
            weight_decay=0.04,
            weight_decay_end=0.4,
            clip_grad=3.0,
            exclude_bias_and_norm=True,
            source="facebookresearch/dino main_dino.py (ViT-S/16, AdamW, lr 5e-4 x B/256)",
        ),
    }
    # cpu: with the published (solo-learn) settings the loss never left ln K (uniform
    # predictions) in the profile's 800 steps and the encoder stayed at its untrained kNN
    # accuracy: at width 0.125 the random encoder's projections of different images are nearly
    # parallel, so the teacher's targets are near uniform and a constant output is the cheapest
    # fit. lightly's CIFAR-10 benchmark head (512 hidden, 64 bottleneck, 2048 prototypes, batch
    # norm), a faster teacher (momentum 0.99) with a sharper temperature (0.04) and no local
    # crops (cheaper steps) learn instead, best at lr 0.05
    # (results/benchmarks/NOTES.md#cpu-method-settings).
    profile_settings = {
        "cpu": {
            "lr": 0.05,
            "method_kwargs": {
                "proj_hidden_dim": 512,
                "proj_output_dim": 64,
                "num_prototypes": 2048,
                "batch_norm": True,
                "base_momentum": 0.99,
                "warmup_teacher_temp": 0.04,
                "teacher_temp": 0.04,
                "num_local_views": 0,
            },
        },
    }
    # Chosen at the cpu_small profile, where they were measured; the cpu profile keeps them.
    profile_settings["cpu_small"] = profile_settings["cpu"]

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """lightly's ``DINOTransform``: 2 global crops with scale (0.4, 1) (blur 1.0 / 0.1,
        solarization 0 / 0.2), then ``n_local_views`` local crops with scale (0.05, 0.4) and blur
        0.5 at :func:`~or_core.methods.view_recipes.local_size` (96 px for 224, 16 px for 32);
        jitter 0.4/0.4/0.2/0.1, bicubic resampling."""
        glob = replace(base, **HALF_JITTER, min_scale=0.4, interpolation="bicubic")
        local = replace(
            glob, size=local_size(base.size), min_scale=0.05, max_scale=0.4, blur_prob=0.5
        )
        return [
            replace(glob, blur_prob=1.0, solarize_prob=0.0),
            replace(glob, blur_prob=0.1, solarize_prob=0.2),
        ] + [local] * n_local_views

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 256,
        num_prototypes: int = 4096,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        # solo-learn scripts/pretrain/cifar/dino.yaml sets no warmup_teacher_temperature_epochs:
        # solo/methods/dino.py's default 0, a constant teacher temperature.
        warmup_teacher_temp_progress: float = 0.0,
        center_momentum: float = 0.9,
        base_momentum: float = 0.9995,
        final_momentum: float = 1.0,
        freeze_last_layer_progress: float = 0.001,  # 1 of 1000 epochs (solo/methods/dino.py)
        # solo-learn scripts/pretrain/cifar/dino.yaml: augmentations/asymmetric.yaml, two 32 px
        # crops.
        num_local_views: int = 0,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        head_args = dict(
            input_dim=feature_dim,
            hidden_dim=proj_hidden_dim,
            bottleneck_dim=proj_output_dim,
            output_dim=num_prototypes,
            batch_norm=batch_norm,
            norm_last_layer=norm_last_layer,
            # lightly counts this in epochs; on_after_backward maps progress to 0 (frozen) or 1.
            freeze_last_layer=1,
        )
        self.projection_head = DINOProjectionHead(**head_args)
        teacher_head = DINOProjectionHead(**head_args)
        teacher_head.load_state_dict(self.projection_head.state_dict())
        self.add_ema_targets("teacher", base_momentum, final_momentum, projection_head=teacher_head)
        self.criterion = DINOLoss(
            output_dim=num_prototypes,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            student_temp=student_temp,
            center_momentum=center_momentum,
        )
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_progress = warmup_teacher_temp_progress
        self.freeze_last_layer_progress = freeze_last_layer_progress
        self.num_local_views = num_local_views

    def teacher_temperature(self, progress: float) -> float:
        """Linear warmup from ``warmup_teacher_temp`` to ``teacher_temp``, then constant
        (constant from the start when ``warmup_teacher_temp_progress`` is 0)."""
        if progress >= self.warmup_teacher_temp_progress:
            return self.teacher_temp
        fraction = progress / self.warmup_teacher_temp_progress
        return self.warmup_teacher_temp + fraction * (self.teacher_temp - self.warmup_teacher_temp)

    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.ema_projection(x)

    def forward_student(self, x: Tensor) -> Tensor:
        return self.projection_head(self.features(x))

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        n_global = self.num_global_views
        teacher_out = self.forward_teacher(torch.cat(list(views[:n_global]))).chunk(n_global)
        student_out: list[Tensor] = []
        for group in same_size_groups(views):
            student_out += self.forward_student(torch.cat(group)).chunk(len(group))
        return self.criterion(
            list(teacher_out), student_out, teacher_temp=self.teacher_temperature(progress)
        )

    def on_after_backward(self, progress: float) -> None:
        frozen = progress < self.freeze_last_layer_progress
        self.projection_head.cancel_last_layer_gradients(current_epoch=0 if frozen else 1)

