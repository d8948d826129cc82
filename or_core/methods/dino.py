"""DINO: Caron, Touvron, Misra, Jegou, Mairal, Bojanowski & Joulin, "Emerging Properties in
Self-Supervised Vision Transformers" (ICCV 2021), https://arxiv.org/abs/2104.14294.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch import Tensor, nn

from or_core.methods.base import OptimizerDefaults, SSLMethod, same_size_groups


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

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/dino.yaml`` and
    ``solo/methods/dino.py``): head hidden 2048, bottleneck 256, 4096 prototypes, no batch norm
    in the head, tau 0.9995 -> 1.0, student temperature 0.1, teacher temperature 0.04 -> 0.07
    over 50 of 1000 epochs (0.05), last layer frozen 1 of 1000 epochs (0.001), LARS lr 0.3
    (batch 256), weight decay 1e-6. ``num_local_views`` defaults to 6, lightly's
    ``DINOTransform`` (solo-learn's CIFAR config uses 0). For a ViT, :attr:`vit_optimizer` is
    the DINO paper's AdamW recipe (lr 5e-4 at batch 256, weight decay 0.04 -> 0.4, 10 warmup
    epochs) and the paper's head has 65536 prototypes, tau 0.996 -> 1.

    The cpu profile (800 steps of a width-0.125 ResNet-18) replaces several of these defaults
    (:data:`or_core.config.PROFILE_METHOD_SETTINGS`): with them the loss never left ``ln K``.

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
    augmentation = "dino"
    multi_crop = True
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.3,
        weight_decay=1e-6,
        source="solo-learn scripts/pretrain/cifar/dino.yaml (ResNet-18, batch 256)",
    )
    vit_optimizer = OptimizerDefaults(
        name="adamw",
        lr=5e-4,
        weight_decay=0.04,
        weight_decay_end=0.4,
        exclude_bias_and_norm=True,
        source="DINO paper / facebookresearch/dino (ViT-S/16, AdamW, batch 256)",
    )

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
        warmup_teacher_temp_progress: float = 0.05,
        center_momentum: float = 0.9,
        base_momentum: float = 0.9995,
        final_momentum: float = 1.0,
        freeze_last_layer_progress: float = 0.001,
        num_local_views: int = 6,
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
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_projection_head = DINOProjectionHead(**head_args)
        self.teacher_projection_head.load_state_dict(self.projection_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_projection_head)
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
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.num_local_views = num_local_views

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.backbone, self.teacher_backbone),
            (self.projection_head, self.teacher_projection_head),
        ]

    def teacher_temperature(self, progress: float) -> float:
        """Linear warmup from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
        if progress >= self.warmup_teacher_temp_progress:
            return self.teacher_temp
        fraction = progress / self.warmup_teacher_temp_progress
        return self.warmup_teacher_temp + fraction * (self.teacher_temp - self.warmup_teacher_temp)

    @torch.no_grad()
    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.teacher_projection_head(self.teacher_backbone(x).flatten(start_dim=1))

    def forward_student(self, x: Tensor) -> Tensor:
        return self.projection_head(self.features(x))

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        n_global = self.num_global_views
        teacher_out = self.forward_teacher(torch.cat(views[:n_global])).chunk(n_global)
        student_out = []
        for group in same_size_groups(views):
            student_out += self.forward_student(torch.cat(group)).chunk(len(group))
        return self.criterion(
            list(teacher_out), student_out, teacher_temp=self.teacher_temperature(progress)
        )

    def on_after_backward(self, progress: float) -> None:
        frozen = progress < self.freeze_last_layer_progress
        self.projection_head.cancel_last_layer_gradients(current_epoch=0 if frozen else 1)

