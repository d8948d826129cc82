"""All4One: Estepa, Rodríguez, Igual, Nieto & Radeva, "All4One: Symbiotic Neighbour Contrastive
Learning via Self-Attention and Redundancy Reduction" (ICCV 2023),
https://arxiv.org/abs/2303.09417.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from torch import Tensor, nn

from or_core.methods.base import OptimizerDefaults, SSLMethod, persistent_memory_bank
from or_core.methods.mocov3 import info_nce

__all__ = ["All4One", "nearest_neighbours", "redundancy_reduction_loss", "sinusoidal_positions"]


def nearest_neighbours(x: Tensor, bank: Tensor, k: int) -> Tensor:
    """The ``k`` entries of ``bank`` ``(M, D)`` with the highest cosine similarity to each row of
    ``x`` ``(N, D)``, nearest first: ``(N, k, D)``. (lightly's ``NNMemoryBankModule`` returns
    the nearest one only.)"""
    similarity = F.normalize(x, dim=1) @ F.normalize(bank, dim=1).t()
    return bank[similarity.topk(k, dim=1).indices]


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """The sinusoidal position encoding of Vaswani et al. (2017), ``(length, dim)``:
    ``PE[t, 2i] = sin(t / 10000^(2i/dim))``, ``PE[t, 2i+1] = cos(t / 10000^(2i/dim))``."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1e4) / dim))
    encoding = torch.zeros(length, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return encoding


def redundancy_reduction_loss(target: Tensor, online: Tensor) -> tuple[Tensor, Tensor]:
    """All4One's feature term for one pair: with the columns of ``target`` and ``online``
    ``(N, D)`` l2-normalized over the batch, ``C = target_hat^T online_hat`` ``(D, D)``;
    returns ``mean_i (C_ii - 1)^2`` and ``mean_{i != j} C_ij^2`` (Barlow Twins' two terms,
    as means)."""
    c = F.normalize(target, dim=0).t() @ F.normalize(online, dim=0)
    on_diagonal = (c.diagonal() - 1).pow(2).mean()
    off_mask = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    off_diagonal = c[off_mask].pow(2).mean()
    return on_diagonal, off_diagonal


class All4One(SSLMethod):
    """All4One: NNCLR's nearest-neighbour contrast, a self-attention "centroid" contrast over
    several neighbours, and a redundancy-reduction term on the features, with an EMA target
    (backbone, projector) whose l2-normalized projections ``t`` fill the support set.

    For view ``a`` and the other view ``b``, ``z`` the online projections, ``p``/``p'`` the
    outputs of the two predictors, ``NN_k(t)`` the ``k`` nearest neighbours of ``t`` in the
    support set (``(N, k, D)``, nearest first) and ``T`` a transformer encoder whose first
    output token is read, after adding sinusoidal position encodings ``PE``:

        L_nnclr    = 1/2 sum_a InfoNCE_tau(NN_1(t_a), p_b)
        L_centroid = 1/2 sum_a InfoNCE_tau_c(T(PE + NN_k(t_a)), T(PE + [p'_b, NN_{k-1}(t_b)]))
        on, off    = sqrt(1/2 sum_a on/off-diagonal mean square of C(t_a, z_b))
        L_feature  = feature_scale * (on + off) / 2
        loss       = w_nnclr L_nnclr + w_centroid L_centroid + w_feature L_feature

    ``InfoNCE`` is :func:`~or_core.methods.mocov3.info_nce` (NNCLR's paper loss),
    ``C`` is :func:`redundancy_reduction_loss`'s cross-correlation. The support set is a queue of
    ``queue_size`` target projections of view 0 (lightly's ``MemoryBankModule``, pushed after
    the look-ups in training mode; saved in ``state_dict``).

    Heads: lightly's ``NNCLRProjectionHead`` (3 layers, batch norm on all) and two
    ``NNCLRPredictionHead``; ``T`` is ``torch.nn.TransformerEncoder``, 3 layers of 8 heads,
    feed-forward ``2 * proj_output_dim``, dropout 0.1.

    Defaults: solo-learn's CIFAR ResNet-18 recipe (``scripts/pretrain/cifar/all4one.yaml``):
    projector 2048 -> 256, predictors hidden 4096, queue 98304, temperature 0.2, tau 0.99 -> 1.0,
    LARS lr 1.0 (batch 256), weight decay 1e-5, eta 0.02, clip_lr, asymmetric augmentations
    (``augmentations/asymmetric.yaml``: BYOL's views); from ``solo/methods/all4one.py``, which
    the recipe does not override: 5 neighbours, the centroid contrast at its loss function's
    default temperature 0.1, the weights 0.5 / 0.5 / 0.5 and the feature scale 10. Not
    reproduced: that file's learning rate of 0.1 for the transformer alone (every parameter
    here follows the run's schedule) and its position encoding along the feature axis (here the
    usual one, along the sequence).

    Args:
        backbone, feature_dim, regularizer, gamma: see :class:`SSLMethod`.
        proj_hidden_dim, proj_output_dim: projector sizes (``proj_output_dim`` divisible by
            ``num_heads``).
        pred_hidden_dim: hidden size of both predictors.
        queue_size: size of the support set.
        num_neighbours: ``k``.
        temperature, centroid_temperature: ``tau`` and ``tau_c``.
        nnclr_weight, centroid_weight, feature_weight, feature_scale: the weights above.
        num_heads, num_layers: of the transformer encoder.
        base_momentum, final_momentum: EMA momentum at the start and the end of training.
        gather_distributed: under DDP, negatives from all processes and the support set fed by
            all processes.
    """

    name = "all4one"
    # The cpu profile's support set: lightly's examples/pytorch/nnclr.py size (4096, "to run on a
    # small dataset"); at the recipe's size the look-ups cost more than the rest of a cpu-profile
    # step (results/benchmarks/NOTES.md#nn-support-set-cpu).
    profile_settings = {"cpu": {"method_kwargs": {"queue_size": 4096}}}
    # solo-learn scripts/pretrain/cifar/all4one.yaml: lars, batch_size 256, lr 1.0,
    # weight_decay 1e-5, eta 0.02, clip_lr True, exclude_bias_n_norm True.
    default_optimizer = OptimizerDefaults(
        name="lars",
        lr=1.0,
        weight_decay=1e-5,
        source="solo-learn scripts/pretrain/cifar/all4one.yaml (ResNet-18, batch 256)",
    )

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        regularizer: str = "none",
        gamma: float | None = None,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 256,
        pred_hidden_dim: int = 4096,
        queue_size: int = 98304,
        num_neighbours: int = 5,
        temperature: float = 0.2,
        centroid_temperature: float = 0.1,
        nnclr_weight: float = 0.5,
        centroid_weight: float = 0.5,
        feature_weight: float = 0.5,
        feature_scale: float = 10.0,
        num_heads: int = 8,
        num_layers: int = 3,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim, regularizer, gamma)
        self.projection_head = NNCLRProjectionHead(feature_dim, proj_hidden_dim, proj_output_dim)
        self.prediction_head = NNCLRPredictionHead(
            proj_output_dim, pred_hidden_dim, proj_output_dim
        )
        self.centroid_prediction_head = NNCLRPredictionHead(
            proj_output_dim, pred_hidden_dim, proj_output_dim
        )
        self.add_ema_targets("target", base_momentum, final_momentum)
        layer = nn.TransformerEncoderLayer(
            d_model=proj_output_dim,
            nhead=num_heads,
            dim_feedforward=2 * proj_output_dim,
            dropout=0.1,
            batch_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, num_layers=num_layers, enable_nested_tensor=False
        )
        self.positions: Tensor
        self.register_buffer(
            "positions", sinusoidal_positions(num_neighbours, proj_output_dim), persistent=False
        )
        self.memory_bank = persistent_memory_bank(
            MemoryBankModule(
                size=(queue_size, proj_output_dim),
                gather_distributed=gather_distributed,
                feature_dim_first=False,
            )
        )
        self.num_neighbours = num_neighbours
        self.temperature = temperature
        self.centroid_temperature = centroid_temperature
        self.nnclr_weight = nnclr_weight
        self.centroid_weight = centroid_weight
        self.feature_weight = feature_weight
        self.feature_scale = feature_scale
        self.gather_distributed = gather_distributed

    def forward_target(self, x: Tensor) -> Tensor:
        """The l2-normalized target projection of ``x`` (no gradient)."""
        return F.normalize(self.ema_projection(x), dim=1)

    def centroid(self, sequence: Tensor) -> Tensor:
        """The transformer's first output token for a ``(N, k, D)`` sequence."""
        return self.transformer(sequence + self.positions.to(sequence.dtype))[:, 0]

    def ssl_loss(self, views: Sequence[Tensor], progress: float) -> dict[str, Tensor]:
        z = [self.projection_head(self.features(v)) for v in views]
        p = [self.prediction_head(zi) for zi in z]
        p2 = [self.centroid_prediction_head(zi) for zi in z]
        t = [self.forward_target(v) for v in views]
        # the support set from before this batch is pushed (training mode only)
        _, bank = self.memory_bank(t[0], update=self.training)
        bank = bank.to(t[0].dtype)
        k = self.num_neighbours
        neighbours = [nearest_neighbours(ti, bank, k) for ti in t]
        tau, tau_c, gather = self.temperature, self.centroid_temperature, self.gather_distributed

        nnclr = 0.5 * sum(
            info_nce(neighbours[a][:, 0], p[1 - a], tau, gather) for a in (0, 1)
        )
        rich = [self.centroid(n) for n in neighbours]
        # the "shifted" sequence: the second predictor's output takes the first place
        shifted = [
            self.centroid(torch.cat([p2[b].unsqueeze(1), neighbours[b][:, : k - 1]], dim=1))
            for b in (0, 1)
        ]
        centroid = 0.5 * sum(info_nce(rich[a], shifted[1 - a], tau_c, gather) for a in (0, 1))
        terms = [redundancy_reduction_loss(t[a], z[1 - a]) for a in (0, 1)]
        on = (0.5 * (terms[0][0] + terms[1][0])).sqrt()
        off = (0.5 * (terms[0][1] + terms[1][1])).sqrt()
        feature = self.feature_scale * 0.5 * (on + off)
        loss = (
            self.nnclr_weight * nnclr
            + self.centroid_weight * centroid
            + self.feature_weight * feature
        )
        return {
            "ssl_loss": loss,
            "nnclr_loss": nnclr.detach(),
            "centroid_loss": centroid.detach(),
            "feature_loss": feature.detach(),
        }
