"""DeepCluster V2: Caron, Misra, Mairal, Goyal, Bojanowski & Joulin, "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments" (NeurIPS 2020),
https://arxiv.org/abs/2006.09882 (its section 4.3 and appendix), on Caron, Bojanowski, Joulin &
Douze, "Deep Clustering for Unsupervised Learning of Visual Features" (ECCV 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed
import torch.nn.functional as F
from lightly.models.modules import SwaVProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils import dist
from torch import Tensor, nn

from or_core.augment import ViewConfig
from or_core.fast_path.host_counters import read_counter, write_counter
from or_core.methods.base import OptimizerDefaults, SSLMethod, persistent_memory_bank
from or_core.methods.view_recipes import simclr_views

__all__ = ["DeepClusterV2", "spherical_kmeans"]


def _all_reduce(x: Tensor) -> Tensor:
    """The sum of ``x`` over the processes (``x`` itself in one process)."""
    if dist.world_size() > 1:
        torch.distributed.all_reduce(x)
    return x


@torch.no_grad()
def spherical_kmeans(
    x: Tensor, num_clusters: int, iterations: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """k-means on the unit sphere (DeepCluster V2's): centroids ``C`` ``(K, D)`` and the
    assignment of every row of ``x`` ``(M, D)`` (unit rows), by ``iterations`` rounds of

        a_m = argmax_k x_m . C_k            (E step: the most similar centroid)
        C_k = normalize(sum_{a_m = k} x_m)  (M step; an empty cluster keeps its centroid)

    from ``K`` distinct rows of ``x`` drawn at random, then a last E step. Under DDP every
    process holds its own rows: the first centroids are process 0's, the M step sums over all
    processes, so all processes end with the same centroids.

    Raises:
        ValueError: fewer rows than clusters.
    """
    if x.shape[0] < num_clusters:
        raise ValueError(f"k-means of {num_clusters} clusters needs as many rows, got {x.shape[0]}")
    pick = torch.randperm(x.shape[0], generator=generator)[:num_clusters].to(x.device)
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
    to fixed prototypes (the centroids of a spherical k-means of past projections), into the
    cluster of a projection of the same image:

        s_h(v) = z_v . C_h^T / tau              (z_v l2-normalized, C_h the K_h centroids)
        loss = 1/H sum_h 1/2 sum_v CE(s_h(v), y_h),   y_h = argmax_k z_{h mod 2} . C_h[k]

    for ``H`` prototype sets (``num_prototypes``), each re-clustered
    (:func:`spherical_kmeans`, ``kmeans_iterations``) from a memory bank of past projections of
    global view ``h mod 2`` (as DeepCluster V2 alternates the crops) every time
    ``memory_size`` new projections have entered it, once per epoch when ``memory_size`` is the
    data set's size. Prototypes are not learned (no gradient): only the encoder and projector
    move. Before the first clustering they are random unit vectors. The cpu_small profile sets
    ``memory_size`` to its subset (:attr:`profile_settings`).

    Not the paper's exact scheme: there the target ``y_h`` of an image is the cluster its
    stored projection (one per image, indexed by the image's position in the data set) fell in
    at the last clustering, i.e. computed by the previous epoch's network. The methods here see
    views, not data set indices, so the target is the cluster of the current projection of
    view ``h mod 2`` under the same fixed centroids (detached); the memory bank is a queue of
    the last ``memory_size`` projections (lightly's ``MemoryBankModule``, saved in
    ``state_dict`` with its count).

    Projector: lightly's ``SwaVProjectionHead`` (linear, BN, ReLU, linear), the head of the SwaV
    code that DeepCluster V2 shares.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/deepclusterv2.yaml``):
    projector 2048 -> 128, prototypes [3000, 3000, 3000], LARS lr 0.6 (batch 256), weight decay
    1e-6, eta 0.02, clip_lr, 11 warm-up epochs, symmetric augmentations
    (``augmentations/symmetric.yaml``: SimCLR's views); temperature 0.1 and 10 k-means
    iterations are ``solo/methods/deepclusterv2.py``'s defaults, which the recipe leaves. Memory
    50,000 (CIFAR's training set: the recipe's one bank entry per image). Not reproduced: the
    recipe's final learning rate of 0.0006 (the schedule here decays to 0).

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes.
        num_prototypes: the number of clusters of each prototype set.
        temperature: ``tau``.
        kmeans_iterations: k-means rounds per clustering.
        memory_size: projections kept per global view; a clustering every ``memory_size``
            new ones.
    """

    name = "deepclusterv2"
    # solo-learn scripts/pretrain/cifar/deepclusterv2.yaml: lars, batch_size 256, lr 0.6,
    # weight_decay 1e-6, eta 0.02, clip_lr True, exclude_bias_n_norm True, warmup_epochs 11.
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=0.6,
        weight_decay=1e-6,
        warmup_epochs=11,
        source="solo-learn scripts/pretrain/cifar/deepclusterv2.yaml (ResNet-18, batch 256)",
    )
    # cpu_small pretrains on 20,480 images: a memory of 50,000 would be clustered first at 2.4
    # of its 5 epochs (half the run against random prototypes); one of the subset's size keeps
    # the recipe's one clustering per epoch. (The cpu profile's 48,000 images are close to
    # 50,000; ci never fills it and trains against the random prototypes.)
    profile_settings = {"cpu_small": {"method_kwargs": {"memory_size": 20480}}}

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
        memory_size: int = 50000,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        if memory_size < max(num_prototypes):
            raise ValueError(
                f"memory_size {memory_size} is smaller than the largest prototype set "
                f"({max(num_prototypes)}): k-means needs a projection per cluster"
            )
        self.projection_head = SwaVProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        # Centroids as frozen parameters (saved, moved with the module, never optimized).
        self.prototypes = nn.ParameterList(
            nn.Parameter(F.normalize(torch.randn(k, proj_output_dim), dim=1), requires_grad=False)
            for k in num_prototypes
        )
        self.memories = nn.ModuleList(
            persistent_memory_bank(
                MemoryBankModule(size=(memory_size, proj_output_dim), feature_dim_first=False)
            )
            for _ in range(self.num_global_views)
        )
        self.temperature = temperature
        self.kmeans_iterations = kmeans_iterations
        self.memory_size = memory_size
        # Projections pushed since the last clustering (a buffer: saved with the memories).
        self.pushed: Tensor
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def cluster(self) -> None:
        """Re-cluster: prototype set ``h`` becomes the k-means centroids of memory ``h mod 2``."""
        for h, prototypes in enumerate(self.prototypes):
            memory = self.memories[h % len(self.memories)].bank
            centroids, _ = spherical_kmeans(memory, prototypes.shape[0], self.kmeans_iterations)
            prototypes.copy_(centroids)

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
        z = [F.normalize(self.projection_head(self.features(v)), dim=1) for v in views]
        losses = []
        for h, prototypes in enumerate(self.prototypes):
            c = prototypes.to(z[0].dtype)
            targets = (z[h % len(z)].detach() @ c.t()).argmax(dim=1)
            scores = [zv @ c.t() / self.temperature for zv in z]
            losses += [F.cross_entropy(s, targets) for s in scores]
        if self.training:
            self._remember([zi.detach().float() for zi in z])
        return torch.stack(losses).mean()  # over the prototype sets and the views

    @torch.no_grad()
    def _remember(self, projections: list[Tensor]) -> None:
        """Push the projections and count them (:meth:`on_train_step_end` re-clusters).

        Under DDP each process keeps its own memories (``memory_size`` each) and counts its own
        pushes: all processes cluster at the same step, together."""
        for memory, zi in zip(self.memories, projections):
            memory(zi, update=True)  # lightly's public call: enqueues (and returns a copy of the bank)
        write_counter(self, "pushed", read_counter(self, "pushed") + projections[0].shape[0])

    @torch.no_grad()
    def on_train_step_end(self, progress: float) -> None:
        """Re-cluster once ``memory_size`` new projections have entered. After the step, not in
        the loss: the step's backward still needs the prototypes its scores were computed with,
        and overwriting them in place before it fails autograd's version check (in float32; a
        bfloat16 loss worked on a copy)."""
        if read_counter(self, "pushed") >= self.memory_size:
            self.cluster()
            write_counter(self, "pushed", 0)
