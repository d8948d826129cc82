"""DeepCluster V2: Caron, Misra, Mairal, Goyal, Bojanowski & Joulin, "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments" (NeurIPS 2020),
https://arxiv.org/abs/2006.09882 (its section 4.3 and appendix), on Caron, Bojanowski, Joulin &
Douze, "Deep Clustering for Unsupervised Learning of Visual Features" (ECCV 2018).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed
import torch.nn.functional as F
from lightly.models.modules import SwaVProjectionHead
from lightly.utils import dist
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.methods.base import OptimizerDefaults, SSLMethod
from or_core.methods.view_recipes import simclr_views

__all__ = ["DeepClusterV2", "spherical_kmeans"]


def _all_reduce(x: Tensor, op: torch.distributed.ReduceOp.RedOpType | None = None) -> Tensor:
    """The sum (or ``op``) of ``x`` over the processes (``x`` itself in one process)."""
    if dist.world_size() > 1:
        torch.distributed.all_reduce(x, op=op or torch.distributed.ReduceOp.SUM)
    return x


@torch.no_grad()
def spherical_kmeans(
    x: Tensor, num_clusters: int, iterations: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """k-means on the unit sphere (DeepCluster V2's): centroids ``C`` ``(K, D)`` and the
    assignment of every row of ``x`` ``(M, D)`` (unit rows), by ``iterations`` rounds of

        a_m = argmax_k x_m . C_k            (E step: the most similar centroid)
        C_k = normalize(sum_{a_m = k} x_m)  (M step; an empty cluster keeps its centroid)

    from ``K`` distinct rows of ``x`` drawn at random, then a last E step. With fewer rows than
    clusters (a small data set) the first centroids are rows drawn with replacement: at most
    ``M`` clusters are filled, the others stay empty. Under DDP every process holds its own
    rows: the first centroids are process 0's, the M step sums over all processes, so all
    processes end with the same centroids.

    Raises:
        ValueError: no rows.
    """
    if x.shape[0] == 0:
        raise ValueError("k-means of no rows: nothing was written to the memory since the last clustering")
    if x.shape[0] >= num_clusters:
        pick = torch.randperm(x.shape[0], generator=generator)[:num_clusters]
    else:
        pick = torch.randint(x.shape[0], (num_clusters,), generator=generator)
    pick = pick.to(x.device)
    centroids = x[pick].clone()
    if dist.world_size() > 1:
        torch.distributed.broadcast(centroids, 0)
    for _ in range(iterations):
        assignments = (x @ centroids.t()).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
        counts = torch.bincount(assignments, minlength=num_clusters)
        sums, counts = _all_reduce(sums), _all_reduce(counts)
        filled = counts > 0
        centroids[filled] = F.normalize(sums[filled], dim=1)
    return centroids, (x @ centroids.t()).argmax(dim=1)


class DeepClusterV2(SSLMethod):
    """DeepCluster V2: each view's projection is classified, by a softmax over its similarities
    to fixed prototypes, into the cluster that its image fell in at the last clustering:

        s_h(v) = z_v . C_h^T / tau              (z_v l2-normalized, C_h the K_h centroids)
        loss = 1/H sum_h 1/2 sum_v CE(s_h(v), y_h[i])

    for ``H`` prototype sets (``num_prototypes``), ``i`` the image's position in the training
    set and ``y_h`` the assignments of the last clustering. The memory keeps one projection per
    image and global view, written at every step. After every epoch, prototype set ``h``
    becomes the centroids of a spherical k-means (:func:`spherical_kmeans`,
    ``kmeans_iterations``) of the projections of view ``h mod 2`` written during that epoch (the
    crops alternate over the sets), and ``y_h`` their assignments. Prototypes are not learned
    (no gradient): only the encoder and projector move.

    Before the first step the training loop makes one pass over the training set without
    gradients (``needs_initial_pass``): it fills the memory with the projections of the untrained
    network and clusters them, as the authors' code does (``init_memory`` in
    ``main_deepclusterv2.py`` of facebookresearch/swav), so the first epoch already has
    targets. (Called without that pass, a method has no assignments until its first clustering:
    its loss is zero until then.) An image whose
    batch an epoch dropped (the last incomplete batch) has no assignment in the next epoch and
    is left out of that epoch's loss. Under DDP every process writes the rows of its own images,
    the k-means sums over all processes (:func:`spherical_kmeans`) and the assignments are
    shared, so each process finds those of any image.

    Projector: lightly's ``SwaVProjectionHead`` (linear, BN, ReLU, linear), the head of the SwaV
    code that DeepCluster V2 shares.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/deepclusterv2.yaml``):
    projector 2048 -> 128, prototypes [3000, 3000, 3000], LARS lr 0.6 (batch 256), weight decay
    1e-6, eta 0.02, clip_lr, 11 warm-up epochs, symmetric augmentations
    (``augmentations/symmetric.yaml``: SimCLR's views); temperature 0.1 and 10 k-means
    iterations are ``solo/methods/deepclusterv2.py``'s defaults, which the recipe leaves. Not
    reproduced: the recipe's final learning rate of 0.0006 (the schedule here decays to 0).

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        num_prototypes: the number of clusters of each prototype set.
        temperature: ``tau``.
        kmeans_iterations: k-means rounds per clustering.
        num_samples: the number of training images (the training loop passes its training
            set's size): the memory's rows.
    """

    name = "deepclusterv2"
    uses_sample_indices = True
    needs_initial_pass = True
    # solo-learn scripts/pretrain/cifar/deepclusterv2.yaml: lars, batch_size 256, lr 0.6,
    # weight_decay 1e-6, eta 0.02, clip_lr True, exclude_bias_n_norm True, warmup_epochs 11.
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.6,
        weight_decay=1e-6,
        warmup_epochs=11,
        source="solo-learn scripts/pretrain/cifar/deepclusterv2.yaml (ResNet-18, batch 256)",
    )

    @classmethod
    def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
        """solo-learn's ``augmentations/symmetric.yaml``: SimCLR's two views
        (:func:`~or_core.methods.view_recipes.simclr_views`)."""
        return simclr_views(base)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
        num_prototypes: Sequence[int] = (3000, 3000, 3000),
        temperature: float = 0.1,
        kmeans_iterations: int = 10,
        num_samples: int = 50000,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = SwaVProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        # Centroids as frozen parameters (saved, moved with the module, never optimized).
        self.prototypes = nn.ParameterList(
            nn.Parameter(F.normalize(torch.randn(k, proj_output_dim), dim=1), requires_grad=False)
            for k in num_prototypes
        )
        self.temperature = temperature
        self.kmeans_iterations = kmeans_iterations
        # Buffers, so that a checkpoint holds them and a resumed run clusters the same memory.
        self.memory: Tensor  # (views, images, dim): each image's last projections
        self.written: Tensor  # (images,): rows written since the last clustering
        self.assignments: Tensor  # (sets, images): cluster of each image, -1 before the first
        self.register_buffer("memory", torch.zeros(self.num_global_views, num_samples, proj_output_dim))
        self.register_buffer("written", torch.zeros(num_samples, dtype=torch.bool))
        self.register_buffer("assignments", torch.full((len(num_prototypes), num_samples), -1, dtype=torch.long))

    @classmethod
    def sizes_from_state(cls, state: Mapping[str, Tensor]) -> dict[str, Any]:
        """``num_samples``: the rows of the saved memory."""
        return {"num_samples": int(state["written"].shape[0])}

    def ssl_loss(self, views: Sequence[Tensor], progress: float, indices: Tensor | None = None) -> Tensor:
        assert indices is not None  # training_loss checks it
        z = [F.normalize(self.projection_head(self.features(v)), dim=1) for v in views]
        targets = self.assignments[:, indices]  # (sets, batch)
        labelled = (targets >= 0).sum(dim=1).clamp(min=1)  # no host sync: 0 / 1 when none
        losses = []
        for h, prototypes in enumerate(self.prototypes):
            c = prototypes.to(z[0].dtype)
            for zv in z:
                scores = (zv @ c.t() / self.temperature).float()
                losses.append(F.cross_entropy(scores, targets[h], ignore_index=-1, reduction="sum") / labelled[h])
        if self.training:
            self._remember(z, indices)
        return torch.stack(losses).mean()  # over the prototype sets and the views

    @torch.no_grad()
    def initial_pass_step(self, views: Sequence[Tensor], indices: Tensor) -> None:
        """Write the untrained network's projections of the global views into the memory."""
        self._remember([F.normalize(self.projection_head(self.features(v)), dim=1) for v in views], indices)

    def end_initial_pass(self) -> None:
        """The first clustering: every image seen in the pass gets its assignment."""
        self.cluster()

    @torch.no_grad()
    def _remember(self, projections: list[Tensor], indices: Tensor) -> None:
        """Write the global views' projections into the rows of their images."""
        for v in range(self.num_global_views):
            self.memory[v, indices] = projections[v].detach().float()
        self.written[indices] = True

    @torch.no_grad()
    def cluster(self) -> None:
        """Prototype set ``h`` becomes the k-means centroids of the rows of memory ``h mod 2``
        written since the last clustering; those rows get their assignments, the others -1."""
        rows = self.written.nonzero().flatten()
        for h, prototypes in enumerate(self.prototypes):
            x = self.memory[h % self.num_global_views, rows]
            centroids, assigned = spherical_kmeans(x, prototypes.shape[0], self.kmeans_iterations)
            prototypes.copy_(centroids)
            self.assignments[h].fill_(-1)
            self.assignments[h, rows] = assigned
        # each process assigned the images it saw (-1 elsewhere): the maximum shares them
        _all_reduce(self.assignments, torch.distributed.ReduceOp.MAX)
        self.written.fill_(False)

    def on_train_epoch_end(self, epoch: int) -> None:
        """Re-cluster after every epoch (before its checkpoint, so a resumed run has the same
        assignments)."""
        self.cluster()
