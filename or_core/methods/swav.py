"""SwaV: Caron, Misra, Mairal, Goyal, Bojanowski & Joulin, "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments" (NeurIPS 2020), https://arxiv.org/abs/2006.09882.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils import dist
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.fast_path.host_counters import read_counter, write_counter
from or_core.methods.base import OptimizerDefaults, SSLMethod, persistent_memory_bank, same_size_groups
from or_core.methods.view_recipes import SIMCLR_JITTER, local_size


class SwaV(SSLMethod):
    """SwaV: swapped prediction of online cluster assignments. Each global view's soft codes,
    computed by Sinkhorn-Knopp over the prototype scores, are predicted from every other view.

    Multi-crop: ``views`` are the 2 global views followed by any number of local crops; codes
    come from the global views only, every view predicts them (lightly's ``SwaVLoss``).
    Projections are l2-normalized and the prototypes (lightly's ``SwaVPrototypes``) are
    renormalized to the unit sphere before each step. The prototypes get no update during the
    first ``freeze_prototypes_progress`` of training (:meth:`on_after_backward`).

    Queue (for small batches): from ``queue_start_progress`` on, the projections of the global
    views are pushed into one lightly ``MemoryBankModule`` per global view; once a queue has been
    filled with ``queue_length`` entries, its prototype scores join the batch's in the
    Sinkhorn step. The queues and their fill count are saved in ``state_dict``
    (exact resume). ``queue_length=0`` turns the queue off.

    Defaults: solo-learn's CIFAR ResNet-18 recipe, all from one source
    (``scripts/pretrain/cifar/swav.yaml`` and the defaults of ``solo/methods/swav.py`` that it
    leaves): two 32 px crops and no local crops (``augmentations: symmetric.yaml``,
    ``num_crops: 2``), projector 2048 -> 128, 3000 prototypes, temperature 0.1, Sinkhorn 3
    iterations at epsilon 0.05, queue 3840 from epoch 50 of 1000 (0.05), prototypes frozen 2 of
    1000 epochs (0.002), LARS lr 0.6 (batch 256), weight decay 1e-6, eta 0.02, clip_lr.
    (solo-learn's multi-crop CIFAR variant, ``scripts/pretrain/cifar-multicrop/swav.yaml``,
    adds 6 crops of 18 px at scale (0.08, 0.5) with the same head; the local crops here are
    16 px at (0.05, 0.14), lightly's ``SwaVTransform`` scaled down, so that variant is not
    reproduced by ``num_local_views=6``.) The views (:meth:`view_recipe`) are lightly's
    ``SwaVTransform``: global crop scale (0.14, 1), no blur at 32 px; solo-learn's
    ``symmetric.yaml`` crops (0.08, 1) with blur 0.5.

    The cpu profile (800 steps of a width-0.125 ResNet-18) replaces several of these defaults
    (:attr:`profile_settings`): with them every projection collapsed to one point and the loss
    to ``ln K``.

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        num_prototypes: number of prototypes.
        temperature: softmax temperature of the swapped prediction.
        sinkhorn_iterations, sinkhorn_epsilon: Sinkhorn-Knopp settings.
        queue_length: entries per queue (0: no queue).
        queue_start_progress: fraction of training after which the queue is filled and used.
        freeze_prototypes_progress: fraction of training with frozen prototypes.
        num_local_views: local crops the augmentation should make (the method takes any number).
        gather_distributed: Sinkhorn over the batches of all processes and queues fed by all
            processes (DDP).
    """

    name = "swav"
    multi_crop = True
    # solo-learn scripts/pretrain/cifar/swav.yaml: lars, batch_size 256, lr 0.6, weight_decay 1e-6,
    # eta 0.02, clip_lr True, exclude_bias_n_norm True (the OptimizerDefaults defaults).
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.6,
        weight_decay=1e-6,
        source="solo-learn scripts/pretrain/cifar/swav.yaml (ResNet-18, batch 256)",
    )
    # cpu: with the published (solo-learn) settings every projection collapsed to one point and
    # the loss stayed at ln K (uniform predictions) in the profile's 800 steps: at width 0.125
    # the random encoder's projections of different images are nearly parallel, so the Sinkhorn
    # codes are near uniform and a constant output is the cheapest fit. lightly's head (512 ->
    # 128, 512 prototypes), sharper codes (Sinkhorn epsilon 0.02), prototypes frozen for the
    # first 20% of training, no local crops (cheaper steps) and no queue learn instead, at the
    # profile's lr (results/benchmarks/NOTES.md#cpu-method-settings).
    profile_settings = {
        "cpu": {
            "method_kwargs": {
                "proj_hidden_dim": 512,
                "proj_output_dim": 128,
                "num_prototypes": 512,
                "sinkhorn_epsilon": 0.02,
                "freeze_prototypes_progress": 0.2,
                "queue_length": 0,
                "num_local_views": 0,
            },
        },
    }
    # Chosen at the cpu_small profile, where they were measured; the cpu profile keeps them.
    profile_settings["cpu_small"] = profile_settings["cpu"]

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """lightly's ``SwaVTransform``: 2 crops with scale (0.14, 1), then ``n_local_views``
        crops with scale (0.05, 0.14) at :func:`~or_core.methods.view_recipes.local_size`; jitter
        0.8/0.8/0.8/0.2, blur 0.5."""
        glob = replace(base, **SIMCLR_JITTER, min_scale=0.14, blur_prob=0.5)
        local = replace(glob, size=local_size(base.size), min_scale=0.05, max_scale=0.14)
        return [glob] * 2 + [local] * n_local_views

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        queue_length: int = 3840,
        queue_start_progress: float = 0.05,
        freeze_prototypes_progress: float = 0.002,
        # solo-learn scripts/pretrain/cifar/swav.yaml: augmentations/symmetric.yaml, two 32 px
        # crops.
        num_local_views: int = 0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = SwaVProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.prototypes = SwaVPrototypes(proj_output_dim, num_prototypes)
        self.criterion = SwaVLoss(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            sinkhorn_epsilon=sinkhorn_epsilon,
            sinkhorn_gather_distributed=gather_distributed,
        )
        self.queue_length = queue_length
        self.queue_start_progress = queue_start_progress
        self.freeze_prototypes_progress = freeze_prototypes_progress
        self.num_local_views = num_local_views
        self.gather_distributed = gather_distributed
        self.queues = (
            nn.ModuleList(
                persistent_memory_bank(
                    MemoryBankModule(
                        size=(queue_length, proj_output_dim),
                        gather_distributed=gather_distributed,
                        feature_dim_first=False,
                    )
                )
                for _ in range(self.num_global_views)
            )
            if queue_length > 0
            else None
        )
        # Entries pushed into each queue so far (a buffer: saved with the queues).
        self.queued: Tensor
        self.register_buffer("queued", torch.zeros((), dtype=torch.long))

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        self.prototypes.normalize()
        projections: list[Tensor] = []
        for group in same_size_groups(views):
            z = F.normalize(self.projection_head(self.features(torch.cat(group))), dim=1)
            projections += z.chunk(len(group))
        scores = [self.prototypes(z) for z in projections]
        n_global = self.num_global_views
        loss = self.criterion(
            high_resolution_outputs=scores[:n_global],
            low_resolution_outputs=scores[n_global:],
            queue_outputs=self._queue_scores(projections[:n_global], progress),
        )
        return loss.reshape(())

    @torch.no_grad()
    def _queue_scores(
        self, global_projections: list[Tensor], progress: float
    ) -> list[Tensor] | None:
        """Push the global projections; the prototype scores of the queues once they are full."""
        if self.queues is None or not self.training or progress < self.queue_start_progress:
            return None
        # Each queue returns its content from before this batch was pushed.
        queued = [
            queue(z.detach(), update=True)[1] for queue, z in zip(self.queues, global_projections)
        ]
        count = read_counter(self, "queued")  # on the host: no synchronization per step
        full = count >= self.queue_length
        processes = dist.world_size() if self.gather_distributed else 1
        pushed = global_projections[0].shape[0] * processes
        write_counter(self, "queued", count + pushed)
        if not full:
            return None
        return [self.prototypes(q.to(global_projections[0].device)) for q in queued]

    def on_after_backward(self, progress: float) -> None:
        if progress < self.freeze_prototypes_progress:
            for p in self.prototypes.parameters():
                p.grad = None
