"""The methods added from solo-learn's list (issue 19): MoCo v3, W-MSE, NNBYOL, NNSiam, ReSSL,
VIbCReg, DeepCluster V2 and All4One. Each loss is checked against a reference computed here
by other means (explicit sums, ``torch.corrcoef``, an eigendecomposition, brute-force nearest
neighbours), their memory banks and schedules against what they must hold, and each trains a
few steps at the ``ci`` profile's settings. The checks every method shares (registry, OR on
the backbone only, EMA targets, exact resume) are in ``tests/test_methods.py``.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss.vicreg_loss import invariance_loss, variance_loss

from or_core.config import PROFILES, resolve_config
from or_core.methods import METHODS, build_method
from or_core.methods.all4one import (
    nearest_neighbours,
    redundancy_reduction_loss,
    sinusoidal_positions,
)
from or_core.methods.deepclusterv2 import spherical_kmeans
from or_core.methods.mocov3 import info_nce
from or_core.methods.ressl import relational_loss
from or_core.methods.vibcreg import IterNorm, normalized_covariance_loss
from or_core.orthogonality import regularized_weights
from test_methods import BATCH, images, make_method, make_views, one_thread  # noqa: F401

NEW_METHODS = ["all4one", "deepclusterv2", "mocov3", "nnbyol", "nnsiam", "ressl", "vibcreg", "wmse"]


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=1)


def brute_force_nearest(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The bank row of highest cosine similarity to each row of ``x``, one row at a time."""
    rows = []
    for xi in x:
        sims = [float(F.cosine_similarity(xi, b, dim=0)) for b in bank]
        rows.append(bank[max(range(len(sims)), key=sims.__getitem__)])
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# MoCo v3
# ----------------------------------------------------------------------------------------------
def test_info_nce_equals_the_explicit_sum():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    k = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(3):
        logits = [float(qn[i] @ kn[j]) / tau for j in range(3)]
        expected -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    expected /= 3
    assert info_nce(q, k, tau).item() == pytest.approx(expected, rel=1e-6)  # float32 vs float64


def test_mocov3_loss_is_two_tau_infonce_of_predictions_against_the_other_views_keys(images):
    method = make_method("mocov3", temperature=0.3)
    views = make_views(method, images)
    torch.manual_seed(0)
    loss = method.training_loss(views, 0.0)["ssl_loss"]
    # the same modules in the same (training) mode: batch norm sees the same batches
    p0, p1 = (method.prediction_head(method.projection_head(method.features(v))) for v in views)
    k0, k1 = (method.forward_key(v) for v in views)
    expected = 2 * 0.3 * (info_nce(p0, k1, 0.3) + info_nce(p1, k0, 0.3))
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not k0.requires_grad and p0.requires_grad


# ----------------------------------------------------------------------------------------------
# NNBYOL, NNSiam: nearest neighbours from lightly's NNMemoryBankModule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nnbyol", "nnsiam"])
def test_nn_methods_predict_the_true_nearest_neighbour_and_push_view_0(name, images):
    method = make_method(name, queue_size=32)
    bank = method.memory_bank
    with torch.no_grad():  # a support set of known, distinct entries
        bank.bank.copy_(F.normalize(torch.randn(32, bank.bank.shape[1]), dim=1))
    before = bank.bank.clone()
    views = make_views(method, images)
    loss = method.training_loss(views, 0.0)["ssl_loss"]
    # the reference from the same modules, in the same (training) mode, and the bank of before
    if name == "nnbyol":  # targets: the EMA projections
        t = [F.normalize(method.forward_target(v), dim=1) for v in views]
        p = [method.prediction_head(method.projection_head(method.features(v))) for v in views]
        nn0, nn1 = (brute_force_nearest(ti, before) for ti in t)
        expected = 2 * (-cos(p[0], nn1).mean() - cos(p[1], nn0).mean())
    else:  # targets: the online projections, without gradient
        z = [method.projection_head(method.features(v)) for v in views]
        p = [method.prediction_head(zi) for zi in z]
        t = [F.normalize(zi.detach(), dim=1) for zi in z]
        nn0, nn1 = (brute_force_nearest(ti, before) for ti in t)
        expected = 0.5 * (-cos(p[0], nn1).mean() - cos(p[1], nn0).mean())
    assert torch.allclose(loss, expected, atol=1e-5)
    # view 0's projections were pushed, after the look-ups, and nothing else changed
    assert torch.allclose(bank.bank[:BATCH], t[0], atol=1e-5)
    assert torch.equal(bank.bank[BATCH:], before[BATCH:]) and int(bank.bank_ptr) == BATCH
    method.eval()
    with torch.no_grad():
        method.training_loss(views, 0.5)
    assert int(bank.bank_ptr) == BATCH  # no push in eval mode


# ----------------------------------------------------------------------------------------------
# ReSSL
# ----------------------------------------------------------------------------------------------
def test_relational_loss_equals_the_explicit_cross_entropy():
    q = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]), dim=1)
    tq, tk = 0.1, 0.04
    expected = 0.0
    for i in range(2):
        sq = [float(q[i] @ b) / tq for b in bank]
        sk = [float(k[i] @ b) / tk for b in bank]
        zq, zk = sum(math.exp(v) for v in sq), sum(math.exp(v) for v in sk)
        expected -= sum(math.exp(b) / zk * (a - math.log(zq)) for a, b in zip(sq, sk))
    expected /= 2
    assert relational_loss(q, k, bank, tq, tk).item() == pytest.approx(expected, rel=1e-5)
    # the same distribution on both sides: the cross-entropy is the teacher's entropy
    p = F.softmax(k @ bank.t() / tq, dim=1)
    entropy = -(p * p.log()).sum(dim=1).mean()
    assert torch.allclose(relational_loss(k, k, bank, tq, tq), entropy, atol=1e-6)


def test_ressl_contrasts_the_strong_query_with_the_weak_key_and_queues_the_keys(images):
    method = make_method("ressl", queue_size=64)
    views = make_views(method, images)
    before = method.queue.bank.clone()
    loss = method.training_loss(views, 0.0)["ssl_loss"]
    q = F.normalize(method.projection_head(method.features(views[0])), dim=1)
    k = method.forward_key(views[1])
    assert torch.allclose(loss, relational_loss(q, k, before, 0.1, 0.04), atol=1e-5)
    assert torch.allclose(method.queue.bank[:BATCH], k, atol=1e-6)
    # the views: view 0 strong, view 1 crop and flip only (solo-learn's ressl.yaml)
    strong, weak = METHODS["ressl"].views(32)
    assert strong.cj_prob == 0.8 and strong.gray_prob == 0.2
    assert weak.cj_prob == 0.0 and weak.gray_prob == 0.0 and weak.min_scale == strong.min_scale


# ----------------------------------------------------------------------------------------------
# W-MSE
# ----------------------------------------------------------------------------------------------
def test_wmse_loss_whitens_by_cholesky_then_takes_the_normalized_mse(images):
    # one sub-batch of the whole batch: the random split into sub-batches changes nothing
    method = make_method("wmse", proj_output_dim=4, whitening_size=BATCH)
    views = make_views(method, images)
    loss = method.training_loss(views, 0.0)["ssl_loss"]
    z = [method.projection_head(method.features(v)).double() for v in views]

    def whiten(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=0)
        cov = centred.t() @ centred / (x.shape[0] - 1)
        return torch.linalg.solve(torch.linalg.cholesky(cov), centred.t()).t()

    w0, w1 = whiten(z[0]), whiten(z[1])
    assert torch.allclose(w0.t() @ w0 / (BATCH - 1), torch.eye(4, dtype=torch.double), atol=1e-8)
    expected = (2 - 2 * cos(w0, w1).mean()).float()
    # float32 Cholesky of a 4 x 4 covariance against float64: ~1e-5 relative
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-5)


def test_wmse_rejects_a_batch_that_does_not_split_into_whitened_sub_batches(images):
    method = make_method("wmse", proj_output_dim=4, whitening_size=BATCH)
    with pytest.raises(ValueError, match="whitening_size"):
        method.training_loss(make_views(method, images[: BATCH - 4]), 0.0)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_wmse_fits_every_profiles_batch(profile):
    """lightly's WMSELoss needs whitening_size >= 2 * proj_output_dim, and the batch must split
    into whole sub-batches: every profile's settings (or the recipe's) satisfy both."""
    cfg = resolve_config(profile, overrides={"method": "wmse"})
    defaults = inspect.signature(METHODS["wmse"].__init__).parameters
    proj = cfg.method_kwargs.get("proj_output_dim", defaults["proj_output_dim"].default)
    size = cfg.method_kwargs.get("whitening_size", defaults["whitening_size"].default)
    assert size >= 2 * proj and cfg.batch_size % size == 0


# ----------------------------------------------------------------------------------------------
# VIbCReg
# ----------------------------------------------------------------------------------------------
def test_iternorm_approaches_zca_whitening_and_uses_running_statistics_in_eval():
    torch.manual_seed(0)
    sources = torch.randn(256, 8)
    # correlated and off-centre, singular values 0.6..1.4 (a well-conditioned covariance)
    mixing = torch.linalg.qr(torch.randn(8, 8))[0] @ torch.diag(torch.linspace(0.6, 1.4, 8))
    x = sources @ mixing + 3.0

    def zca_error(iterations: int) -> float:
        """max |IterNorm - Sigma^{-1/2} (x - mean)| per group of 4, the reference by eigh."""
        norm = IterNorm(8, num_groups=2, iterations=iterations, eps=0.0, momentum=1.0, affine=False)
        out = norm(x)
        assert (norm.num_groups, norm.num_channels) == (2, 4)
        errors = []
        for g in range(2):
            centred = x[:, 4 * g : 4 * g + 4] - x[:, 4 * g : 4 * g + 4].mean(dim=0)
            values, vectors = torch.linalg.eigh(centred.t() @ centred / 256)
            zca = centred @ vectors @ torch.diag(values.rsqrt()) @ vectors.t()
            errors.append((out[:, 4 * g : 4 * g + 4] - zca).abs().max().item())
        return max(errors)

    # Newton's iteration converges: measured over seeds 0-3, 5e-4..3e-3 after 5 steps (VIbCReg's
    # partial whitening) and 1e-6 after 10, on outputs of unit variance (float32 rounding)
    assert zca_error(10) < 1e-4 < zca_error(5)
    norm = IterNorm(8, num_groups=2, iterations=5, momentum=1.0)
    out = norm(x)
    norm.eval()  # momentum 1: the running statistics are this batch's
    assert torch.allclose(norm(x), out, atol=1e-5)


def test_normalized_covariance_is_the_mean_squared_off_diagonal_correlation():
    z = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 1.0], [4.0, 5.0, -1.0], [0.0, 3.0, 2.0]])
    r = torch.corrcoef(z.t())
    expected = (r.pow(2).sum() - r.diagonal().pow(2).sum()) / 9
    assert torch.allclose(normalized_covariance_loss(z), expected, atol=1e-6)
    assert torch.allclose(normalized_covariance_loss(10 * z + 5), expected, atol=1e-6)  # scale-free


def test_vibcreg_loss_is_the_weighted_sum_and_iternorm_is_an_undecayed_norm(images):
    method = make_method("vibcreg", invariance_weight=2.0, variance_weight=3.0,
                         covariance_weight=5.0)
    views = make_views(method, images)
    out = method.training_loss(views, 0.0)
    z0, z1 = (method.projection_head(method.features(v)) for v in views)
    expected = (2.0 * invariance_loss(z0, z1) + 3.0 * (variance_loss(z0) + variance_loss(z1))
                + 5.0 * (normalized_covariance_loss(z0) + normalized_covariance_loss(z1)))
    # IterNorm's running statistics moved between the two forwards; training mode does not
    # read them, so the outputs agree to float32 rounding
    assert torch.allclose(out["ssl_loss"], expected, rtol=1e-5)
    assert out["covariance_loss"] > 0
    decay, no_decay = method.parameter_groups(weight_decay=1e-4)
    iternorm = method.projection_head[1]
    assert {id(p) for p in iternorm.parameters()} <= {id(p) for p in no_decay["params"]}
    assert not {id(p) for p in iternorm.parameters()} & {id(p) for p in decay["params"]}


# ----------------------------------------------------------------------------------------------
# All4One
# ----------------------------------------------------------------------------------------------
def test_all4one_pieces_equal_their_definitions():
    torch.manual_seed(0)
    x, bank = torch.randn(5, 6), torch.randn(20, 6)
    neighbours = nearest_neighbours(x, bank, 3)
    for i in range(5):
        order = sorted(range(20), key=lambda j: -float(F.cosine_similarity(x[i], bank[j], dim=0)))
        assert torch.equal(neighbours[i], bank[order[:3]])
    pe = sinusoidal_positions(5, 8)
    assert pe[0].tolist() == pytest.approx([0, 1] * 4)
    assert pe[1, 0].item() == pytest.approx(math.sin(1))
    assert pe[1, 1].item() == pytest.approx(math.cos(1))
    assert pe[3, 2].item() == pytest.approx(math.sin(3 / 10000 ** (2 / 8)), rel=1e-5)
    # identical inputs with orthogonal columns: a perfect identity cross-correlation
    eye = torch.eye(4)
    assert [t.item() for t in redundancy_reduction_loss(eye, 2 * eye)] == pytest.approx([0, 0])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # columns (1,1)/sqrt2 and (1,0)
    c = F.normalize(a, dim=0).t() @ F.normalize(b, dim=0)  # [[1/sqrt2, 1], [1/sqrt2, 0]]
    on, off = redundancy_reduction_loss(a, b)
    assert on.item() == pytest.approx(((c[0, 0] - 1) ** 2 + 1) / 2)
    assert off.item() == pytest.approx((1 + 0.5) / 2)


def test_all4one_combines_its_three_terms_and_trains_its_transformer(images):
    method = make_method("all4one", queue_size=64)
    views = make_views(method, images)
    before = method.memory_bank.bank.clone()
    out = method.training_loss(views, 0.0)
    expected = 0.5 * (out["nnclr_loss"] + out["centroid_loss"] + out["feature_loss"])
    assert torch.allclose(out["ssl_loss"], expected, atol=1e-6)
    assert all(torch.isfinite(v) for v in out.values()) and out["feature_loss"] > 0
    out["loss"].backward()
    assert all(p.grad is not None for p in method.transformer.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in method.centroid_prediction_head.parameters())
    # view 0's target projections (unit rows) were pushed, after the look-ups
    pushed = method.memory_bank.bank[:BATCH]
    assert torch.allclose(pushed.norm(dim=1), torch.ones(BATCH), atol=1e-5)
    assert torch.equal(method.memory_bank.bank[BATCH:], before[BATCH:])


# ----------------------------------------------------------------------------------------------
# DeepCluster V2
# ----------------------------------------------------------------------------------------------
def test_spherical_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3]  # three orthogonal directions
    labels = torch.arange(60) % 3
    x = F.normalize(centres[labels] + 0.1 * torch.randn(60, 4, generator=generator), dim=1)
    # restarts from 3 random rows until every cluster is hit (k-means++ is not the method's)
    for seed in range(20):
        centroids, assignments = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(seed))
        if len(set(assignments.tolist())) == 3:
            break
    mapping = {int(a): int(lab) for a, lab in zip(assignments, labels)}
    assert [mapping[int(a)] for a in assignments] == labels.tolist()  # the same partition
    for k, lab in mapping.items():
        assert float(centroids[k] @ centres[lab]) > 0.99
    assert torch.allclose(centroids.norm(dim=1), torch.ones(3))
    # fewer rows than clusters: each row is its own cluster's centroid, the other clusters empty
    centroids, assignments = spherical_kmeans(x[:2], 3, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(centroids[assignments], x[:2], atol=1e-6)
    with pytest.raises(ValueError, match="no rows"):
        spherical_kmeans(x[:0], 3, 1)


def test_deepclusterv2_classifies_each_image_into_its_cluster_of_the_last_clustering(images):
    # a data set of 2 * BATCH images, this batch holding the images at positions 2, 4, ..., 2B
    # in reverse order: the memory and the targets are indexed by position, not by batch row
    method = make_method("deepclusterv2", num_prototypes=(4, 6), num_samples=2 * BATCH + 1, temperature=0.2)
    indices = torch.arange(2, 2 * BATCH + 1, 2).flip(0)
    views = make_views(method, images)
    with pytest.raises(ValueError, match="needs the positions of the batch's 16 images"):
        method.training_loss(views, 0.0)

    # before the first clustering: no targets, a zero loss, the memory filled
    out = method.training_loss(views, 0.0, indices=indices)
    assert out["ssl_loss"].item() == 0.0
    out["loss"].backward()  # a zero gradient, but a graph
    z = [F.normalize(method.projection_head(method.features(v)), dim=1).detach() for v in views]
    for v in range(2):
        assert torch.allclose(method.memory[v, indices], z[v], atol=1e-6)
    assert method.written.nonzero().flatten().tolist() == sorted(indices.tolist())

    method.on_train_epoch_end(0)  # the clustering
    assert not method.written.any()
    for h, prototypes in enumerate(method.prototypes):
        assert not prototypes.requires_grad
        assert torch.allclose(prototypes.norm(dim=1), torch.ones(prototypes.shape[0]), atol=1e-5)
        sims = method.memory[h % 2, indices] @ prototypes.t()  # the nearest centroid, to rounding (matmul shapes differ)
        assert torch.allclose(sims.gather(1, method.assignments[h, indices][:, None]).squeeze(1), sims.max(dim=1).values, atol=1e-5)
        nearest = sims.argmax(dim=1)
        unseen = torch.ones(2 * BATCH + 1, dtype=torch.bool)
        unseen[indices] = False
        assert (method.assignments[h, unseen] == -1).all()
        assert len(set(nearest.tolist())) > 1  # not collapsed onto one centroid

    # the loss: cross-entropy of every view against the image's assignment, rows without one
    # (positions 1, 3, ...) left out
    mixed = torch.cat([indices[: BATCH // 2], torch.arange(1, BATCH, 2)[: BATCH - BATCH // 2]])
    targets = [method.assignments[h, mixed].clone() for h in range(2)]
    out = method.training_loss(views, 0.5, indices=mixed)
    z = [F.normalize(method.projection_head(method.features(v)), dim=1) for v in views]
    expected = 0.0
    labelled = slice(0, BATCH // 2)
    for h, c in enumerate(method.prototypes):
        assert (targets[h][BATCH // 2:] == -1).all()
        expected += sum(F.cross_entropy(zv[labelled] @ c.t() / 0.2, targets[h][labelled]) for zv in z) / 2
    assert torch.allclose(out["ssl_loss"], expected / 2, atol=1e-5)
    method.zero_grad()
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in regularized_weights(method.backbone))


# ----------------------------------------------------------------------------------------------
# Every new method: trains a few steps at the ci profile's settings
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW_METHODS)
def test_new_method_takes_ci_profile_steps_with_a_finite_loss(name, cifar10_dir):
    from or_core.train import training_step
    from or_core.training_run import build_run

    cfg = resolve_config("ci", overrides={"method": name, "regularizer": "so",
                                          "data_root": str(cifar10_dir.parent), "subset": 256})
    torch.manual_seed(0)
    run = build_run(cfg)
    assert run.method.regularizer is not None
    rng = torch.Generator().manual_seed(0)
    images, indices = next(iter(run.epoch_batches(0)))
    for step in range(2):
        out = training_step(run, images, step / 10, rng, indices)
        assert torch.isfinite(out["loss"]) and out["or_term"] > 0, (name, out)
