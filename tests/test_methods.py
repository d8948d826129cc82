"""The self-supervised methods of ``or_core.methods``: registry, training steps, OR scope, EMA.

Views are made from real CIFAR-10 images when the shared archive is there (``cifar10_dir``),
else from random tensors (smoke checks only); heads are shrunk so that everything runs on CPU.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightly.loss.vicreg_loss import covariance_loss, variance_loss
from torch import Tensor, nn

from or_core import regularized_weights, so_penalty
from or_core.methods import (
    METHODS,
    OptimizerDefaults,
    SSLMethod,
    available_methods,
    build_method,
    cosine_progress,
)

# lightly's DINO head uses the deprecated torch.nn.utils.weight_norm.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# The methods this package ships; a method added as a new module is registered beside them.
BUILT_IN_METHODS = {
    "all4one", "barlowtwins", "byol", "byol_whitening", "deepclusterv2", "dino", "mocov2",
    "mocov3", "nnbyol", "nnclr", "nnsiam", "ressl", "simclr", "simsiam", "swav", "vibcreg",
    "vicreg", "wmse",
}
EMA_METHODS = ["all4one", "byol", "byol_whitening", "dino", "mocov2", "mocov3", "nnbyol", "ressl"]

IMAGE_SIZE = 32
LOCAL_SIZE = 16
BATCH = 16

# Small heads (the published sizes are thousands wide) on top of proj_hidden_dim and
# proj_output_dim, which every method takes; a method not listed keeps its other defaults.
SMALL_HEADS: dict[str, dict] = {
    "all4one": dict(pred_hidden_dim=64, queue_size=128),
    "barlowtwins": {},
    "byol": dict(pred_hidden_dim=64),
    "byol_whitening": dict(pred_hidden_dim=64),
    "deepclusterv2": dict(num_prototypes=(4, 6), num_samples=BATCH),
    "dino": dict(num_prototypes=256, num_local_views=2),
    "mocov2": dict(queue_size=128),
    "mocov3": dict(pred_hidden_dim=64),
    "nnbyol": dict(pred_hidden_dim=64, queue_size=128),
    "nnclr": dict(pred_hidden_dim=64, queue_size=128),
    "nnsiam": dict(pred_hidden_dim=16, queue_size=128),
    "ressl": dict(queue_size=128),
    "simclr": {},
    "simsiam": dict(pred_hidden_dim=16),
    "swav": dict(num_prototypes=64, queue_length=32, num_local_views=2),
    "vibcreg": {},
    "vicreg": {},
    # a whitened sub-batch of 8 (the smallest batch here) needs at most 4 dimensions
    "wmse": dict(proj_output_dim=4, whitening_size=8),
}


# ----------------------------------------------------------------------------------------------
# Backbone, images, views
# ----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one intra-op thread is faster than two, and a machine busy
    with other processes does not slow it down by spinning OpenMP threads (measured: 30 s
    instead of 250 s for this file at load average 6 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyConvNet(nn.Module):
    """A small CNN with conv and linear weights (both regularized by OR), for CPU tests."""

    def __init__(self, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def make_backbone() -> tuple[nn.Module, int]:
    """or_core's narrow CIFAR ResNet-18 if ``or_core.backbones`` exists, else a tiny CNN."""
    try:
        from or_core.backbones import build_backbone
    except ImportError:
        backbone = TinyConvNet()
    else:
        built = build_backbone("resnet18", image_size=IMAGE_SIZE, width=0.125)
        backbone = built[0] if isinstance(built, tuple) else built
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        feature_dim = backbone(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)).flatten(1).shape[1]
    backbone.train(was_training)
    return backbone, feature_dim


def make_method(name: str, **kwargs) -> SSLMethod:
    torch.manual_seed(0)
    backbone, feature_dim = make_backbone()
    args = {"proj_hidden_dim": 64, "proj_output_dim": 32, **SMALL_HEADS.get(name, {}), **kwargs}
    return build_method(name, backbone, feature_dim, **args)


@pytest.fixture(scope="module")
def images(request) -> Tensor:
    """``BATCH`` CIFAR-10 training images as floats in [0, 1], one or two per class."""
    try:
        root = request.getfixturevalue("cifar10_dir")
    except pytest.skip.Exception:
        root = None
    if root is None:
        warnings.warn("CIFAR-10 not available: the method tests run on random tensors")
        generator = torch.Generator().manual_seed(0)
        return torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    from or_core.data import decode_image, scan_image_folder

    _, files, labels = scan_image_folder(root / "train")
    picked, per_class = [], {}
    for path, label in zip(files, labels):
        if per_class.get(label, 0) < math.ceil(BATCH / 10):
            per_class[label] = per_class.get(label, 0) + 1
            picked.append(path)
    picked = picked[:BATCH]
    return torch.stack([decode_image(p, IMAGE_SIZE) for p in picked]).float() / 255.0


def random_view(x: Tensor, size: int, generator: torch.Generator, scale=(0.3, 1.0)) -> Tensor:
    """A crude batched augmentation: one random crop resized to ``size``, flips, brightness."""
    n, _, h, w = x.shape
    area = float(torch.empty(1).uniform_(*scale, generator=generator))
    side = max(4, int(round(h * area**0.5)))
    top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
    v = F.interpolate(x[:, :, top : top + side, left : left + side], size=(size, size),
                      mode="bilinear", align_corners=False)
    flip = torch.rand(n, generator=generator) < 0.5
    v = torch.where(flip[:, None, None, None], v.flip(3), v)
    v = v * torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=generator)
    return (v.clamp(0, 1) - 0.45) / 0.25


def make_views(method: SSLMethod, x: Tensor, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    views = [random_view(x, IMAGE_SIZE, gen) for _ in range(method.num_global_views)]
    views += [random_view(x, LOCAL_SIZE, gen, (0.05, 0.3)) for _ in range(method.num_local_views)]
    return views


def train_step(method: SSLMethod, optimizer, views, progress: float) -> dict[str, Tensor]:
    """One step on a batch that is the whole data set (``indices`` 0..N-1), so also one epoch."""
    out = method.training_loss(views, progress, indices=torch.arange(views[0].shape[0]))
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    method.on_after_backward(progress)
    optimizer.step()
    method.on_train_step_end(progress)
    method.on_train_epoch_end(0)
    return out


def sgd(method: SSLMethod, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(method.parameter_groups(weight_decay=1e-5), lr=lr, momentum=0.9)


def target_modules(method: SSLMethod) -> list[nn.Module]:
    return [target for _, target in method.momentum_pairs()]


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def test_registry_lists_every_method_with_its_declarations():
    assert BUILT_IN_METHODS <= set(available_methods())
    assert available_methods() == sorted(METHODS)
    for name, cls in METHODS.items():
        assert issubclass(cls, SSLMethod)
        assert cls.name == name
        assert cls.num_global_views == 2
        opt = cls.default_optimizer
        assert isinstance(opt, OptimizerDefaults)
        assert opt.name in {"lars", "sgd", "adamw"} and opt.lr > 0 and opt.weight_decay >= 0
        assert opt.source and opt.to_dict()["lr"] == opt.lr
        assert math.isclose(opt.scaled_lr(512), 2 * opt.lr)
        assert cls.__doc__ and "Defaults" in cls.__doc__
    assert METHODS["dino"].optimizer_defaults("vit_small", 224).name == "adamw"
    assert METHODS["dino"].multi_crop and METHODS["swav"].multi_crop
    assert not METHODS["byol"].multi_crop


def test_every_method_owns_its_views_and_method_views_finds_them():
    augment = pytest.importorskip("or_core.augment")
    for name, cls in METHODS.items():
        views = cls.views(IMAGE_SIZE, n_local_views=3)
        assert len(views) == cls.num_global_views + (3 if cls.multi_crop else 0), name
        assert [v.size for v in views[: cls.num_global_views]] == [IMAGE_SIZE] * 2, name
        assert augment.method_views(name, IMAGE_SIZE, n_local_views=3) == views, name
        for alias in cls.aliases:
            assert augment.method_views(alias, IMAGE_SIZE, n_local_views=3) == views, alias
    # the recipes that differ: MoCo v2's scale, SimCLR's jitter, DINO's bicubic crops
    assert METHODS["mocov2"].views(IMAGE_SIZE)[0].min_scale == 0.2
    assert METHODS["simclr"].views(IMAGE_SIZE)[0].cj_sat == 0.8
    assert METHODS["dino"].views(IMAGE_SIZE)[0].interpolation == "bicubic"
    assert METHODS["byol_whitening"].views(IMAGE_SIZE) == METHODS["byol"].views(IMAGE_SIZE)


def test_profile_settings_name_known_profiles_and_config_fields():
    from or_core.config import PROFILES, method_profile_settings

    declared = {name: cls.profile_settings for name, cls in METHODS.items() if cls.profile_settings}
    # the small profiles' exceptions
    assert set(declared) == {"all4one", "dino", "nnbyol", "nnclr", "nnsiam", "swav", "wmse"}
    for name, settings in declared.items():
        assert set(settings) <= set(PROFILES), name
        for profile in settings:
            assert method_profile_settings(name, profile) == settings[profile]


def test_unknown_method_error_lists_valid_names():
    backbone, feature_dim = make_backbone()
    with pytest.raises(ValueError) as error:
        build_method("byl", backbone, feature_dim)
    for name in available_methods():
        assert name in str(error.value)


def test_unknown_regularizer_and_bad_progress_are_rejected():
    backbone, feature_dim = make_backbone()
    with pytest.raises(ValueError, match="regularizer"):
        build_method("simclr", backbone, feature_dim, regularizer="orth")
    method = make_method("simclr")
    x = torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="progress"):
        method.training_loss([x, x], progress=1.5)
    with pytest.raises(ValueError, match="views"):
        method.training_loss([x, x, x], progress=0.0)


# ----------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", available_methods())
def test_training_steps_give_finite_loss_and_move_the_backbone(name, images):
    method = make_method(name)  # no OR: the SSL loss alone must move the backbone
    optimizer = sgd(method)
    before = {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}
    for step in range(3):
        out = train_step(method, optimizer, make_views(method, images, seed=step), step / 10)
        assert {"loss", "ssl_loss", "or_term"} <= set(out)
        for key, value in out.items():
            assert value.dim() == 0 and torch.isfinite(value), (name, key, value)
        assert out["or_term"].item() == 0.0 and torch.equal(out["loss"], out["ssl_loss"])
    moved = {k for k, v in method.backbone.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])}
    assert {n for n, _ in regularized_weights(method.backbone)} <= moved


@pytest.mark.parametrize("name", available_methods())
def test_batch_of_eight_works(name):
    method = make_method(name, regularizer="srip")
    x = torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    out = method.training_loss(make_views(method, x), progress=0.5, indices=torch.arange(8))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("name", ["dino", "swav"])
def test_multi_crop_methods_take_any_number_of_local_crops(name):
    x = torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    for num_local in (0, 3):
        method = make_method(name, num_local_views=num_local)
        views = make_views(method, x)
        assert len(views) == 2 + num_local
        out = method.training_loss(views, progress=0.5)
        assert torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------------------------
# The orthogonality term: the online backbone's conv/linear weights, nothing else
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", available_methods())
def test_or_term_is_gamma_times_so_over_the_online_backbone_only(name):
    gamma = 1e-3
    method = make_method(name, regularizer="so", gamma=gamma)
    backbone_weights = regularized_weights(method.backbone)
    assert method.regularizer.names == [n for n, _ in backbone_weights]

    expected = gamma * sum(so_penalty(w) for _, w in backbone_weights)
    or_term = method.or_term()
    assert torch.allclose(or_term, expected, rtol=1e-5), (or_term, expected)

    # Heads, predictors, prototypes and EMA targets do not enter: perturbing them changes nothing.
    backbone_params = {id(p) for p in method.backbone.parameters()}
    others = [p for p in method.parameters() if id(p) not in backbone_params]
    assert others, "every method has heads"
    with torch.no_grad():
        for p in others:
            p.add_(torch.randn_like(p))
    assert torch.allclose(method.or_term(), or_term)
    # ... and its gradient reaches the backbone only.
    method.zero_grad(set_to_none=True)
    method.or_term().backward()
    assert all(p.grad is None for p in others)
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for _, w in backbone_weights)


def test_no_regularizer_gives_a_zero_or_term():
    method = make_method("byol")
    assert method.regularizer is None
    assert method.or_term().item() == 0.0


# ----------------------------------------------------------------------------------------------
# EMA targets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EMA_METHODS)
def test_ema_targets_are_frozen_and_move_toward_the_online_networks(name, images):
    method = make_method(name, regularizer="so")
    pairs = method.momentum_pairs()
    assert pairs
    for online, target in pairs:
        assert all(not p.requires_grad for p in target.parameters())
        assert any(p.requires_grad for p in online.parameters())
        for p, q in zip(online.parameters(), target.parameters()):
            assert torch.equal(p, q)  # the target starts as a copy
    # The regularizer holds no target weight.
    target_params = {id(p) for t in target_modules(method) for p in t.parameters()}
    assert not target_params & {id(w) for _, w in regularized_weights(method.backbone)}

    optimizer = sgd(method, lr=0.1)
    train_step(method, optimizer, make_views(method, images, seed=0), 0.0)
    old = [[q.detach().clone() for q in t.parameters()] for t in target_modules(method)]
    online = [[p.detach().clone() for p in o.parameters()] for o, _ in pairs]
    distance_before = sum((a - b).pow(2).sum() for o, t in zip(online, old) for a, b in zip(o, t))
    assert distance_before > 0  # the optimizer step moved the online networks away

    # The next training call first updates the targets with the momentum at `progress`.
    progress = 0.3
    m = method.momentum(progress)
    assert 0.0 < m < 1.0
    method.training_loss(make_views(method, images, seed=1), progress)
    new = [[q.detach() for q in t.parameters()] for t in target_modules(method)]
    for o, t_old, t_new in zip(online, old, new):
        for a, b, c in zip(o, t_old, t_new):
            assert torch.allclose(c, m * b + (1 - m) * a, atol=1e-6)
    distance_after = sum((a - c).pow(2).sum() for o, t in zip(online, new) for a, c in zip(o, t))
    assert distance_after < distance_before

    # In eval mode the targets stay put.
    method.eval()
    frozen = [[q.detach().clone() for q in t.parameters()] for t in target_modules(method)]
    with torch.no_grad():
        method.training_loss(make_views(method, images, seed=2), 0.5)
    for t, f in zip(target_modules(method), frozen):
        assert all(torch.equal(q, r) for q, r in zip(t.parameters(), f))


def test_momentum_schedule_runs_from_base_to_final():
    method = make_method("byol", base_momentum=0.99, final_momentum=1.0)
    assert method.momentum(0.0) == pytest.approx(0.99)
    assert method.momentum(0.5) == pytest.approx(0.995)
    assert method.momentum(1.0) == pytest.approx(1.0)
    assert cosine_progress(0.25, 0.0, 1.0) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)


def test_dino_schedules_and_frozen_last_layer(images):
    method = make_method("dino", warmup_teacher_temp=0.04, teacher_temp=0.07,
                         warmup_teacher_temp_progress=0.5, freeze_last_layer_progress=0.1)
    assert method.teacher_temperature(0.0) == pytest.approx(0.04)
    assert method.teacher_temperature(0.25) == pytest.approx(0.055)
    assert method.teacher_temperature(0.9) == pytest.approx(0.07)
    last_layer = list(method.projection_head.last_layer.parameters())
    for progress, frozen in ((0.05, True), (0.5, False)):
        method.zero_grad(set_to_none=True)
        method.training_loss(make_views(method, images), progress)["loss"].backward()
        method.on_after_backward(progress)
        trainable = [p for p in last_layer if p.requires_grad]
        assert trainable and all((p.grad is None) == frozen for p in trainable)


@pytest.mark.parametrize("vit", ["vit_tiny"])
def test_dino_trains_a_vit_on_global_and_local_crops(vit, images):
    """DINO's recipe with a ViT (the paper's Table 3): 32 px global and 16 px local crops of real
    CIFAR-10 images through one ViT, a finite loss with the OR term, and every regularized
    weight of the ViT moves."""
    from or_core.backbones import build_backbone

    torch.manual_seed(0)
    backbone, feature_dim = build_backbone(vit, image_size=IMAGE_SIZE)
    method = build_method("dino", backbone, feature_dim, regularizer="so", gamma=1e-4,
                          proj_hidden_dim=64, proj_output_dim=32, **SMALL_HEADS["dino"])
    optimizer = sgd(method)
    before = {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}
    for step in range(2):
        views = make_views(method, images[:16], seed=step)
        assert {v.shape[-1] for v in views} == {IMAGE_SIZE, LOCAL_SIZE}
        out = train_step(method, optimizer, views, 0.5)
        assert torch.isfinite(out["loss"]) and out["or_term"].item() > 0
    moved = {k for k, v in method.backbone.state_dict().items() if not torch.equal(v, before[k])}
    assert {n for n, _ in regularized_weights(method.backbone)} <= moved


def test_swav_queue_fills_then_joins_and_prototypes_start_frozen(images):
    method = make_method("swav", queue_length=32, queue_start_progress=0.0,
                         freeze_prototypes_progress=0.5)
    views = make_views(method, images)
    method.training_loss(views, 0.1)["loss"].backward()
    method.on_after_backward(0.1)
    assert all(p.grad is None for p in method.prototypes.parameters())
    assert int(method.queued) == BATCH
    method.training_loss(views, 0.2)
    method.zero_grad(set_to_none=True)
    out = method.training_loss(views, 0.6)  # the queue (32 entries) is now full and used
    out["loss"].backward()
    method.on_after_backward(0.6)
    assert int(method.queued) == 3 * BATCH and torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in method.prototypes.parameters())


def test_mocov2_queue_is_updated_in_training_only(images):
    method = make_method("mocov2")
    views = make_views(method, images)
    banks = [c.memory_bank.bank.clone() for c in method.criteria]
    method.training_loss(views, 0.0)
    assert all(not torch.equal(b, c.memory_bank.bank) for b, c in zip(banks, method.criteria))
    method.eval()
    banks = [c.memory_bank.bank.clone() for c in method.criteria]
    with torch.no_grad():
        method.training_loss(views, 0.0)
    assert all(torch.equal(b, c.memory_bank.bank) for b, c in zip(banks, method.criteria))


# ----------------------------------------------------------------------------------------------
# Exact resume: state_dict carries EMA targets, DINO's center, memory banks and queues
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", available_methods())
def test_state_dict_round_trip_resumes_exactly(name, images, tmp_path):
    kwargs = dict(queue_start_progress=0.0) if name == "swav" else {}
    method = make_method(name, regularizer="so", **kwargs)
    optimizer = sgd(method)
    for step in range(2):
        torch.manual_seed(step)
        train_step(method, optimizer, make_views(method, images, seed=step), step / 4)
    path = tmp_path / "state.pt"
    torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict()}, path)

    resumed = make_method(name, regularizer="so", **kwargs)
    resumed_optimizer = sgd(resumed)
    state = torch.load(path, weights_only=True)
    resumed.load_state_dict(state["method"])
    resumed_optimizer.load_state_dict(state["optimizer"])

    views = make_views(method, images, seed=2)
    torch.manual_seed(2)
    out = train_step(method, optimizer, views, 0.5)
    torch.manual_seed(2)
    out_resumed = train_step(resumed, resumed_optimizer, views, 0.5)
    assert torch.equal(out["loss"], out_resumed["loss"])
    state, resumed_state = method.state_dict(), resumed.state_dict()
    assert state.keys() == resumed_state.keys()
    for key, value in state.items():
        assert isinstance(value, Tensor) and torch.equal(value, resumed_state[key]), key
    if name in ("all4one", "deepclusterv2", "mocov2", "nnbyol", "nnclr", "nnsiam", "ressl", "swav"):
        assert any(key.endswith(("bank", "memory")) for key in state), "memory banks are saved"


# ----------------------------------------------------------------------------------------------
# BYOL + whitening: BYOL plus VICReg's variance/covariance on the representation
# ----------------------------------------------------------------------------------------------
def test_byol_whitening_is_byol_plus_vicreg_terms_on_the_representation(images):
    whitening = make_method("byol_whitening", variance_weight=1.0, covariance_weight=0.04)
    byol = make_method("byol")
    byol.load_state_dict(whitening.state_dict())
    views = make_views(whitening, images)

    out_w = whitening.training_loss(views, 0.0)
    out_b = byol.training_loss(views, 0.0)
    h0, h1 = (byol.features(v) for v in views)
    variance = 0.5 * (variance_loss(h0) + variance_loss(h1))
    covariance = covariance_loss(h0) + covariance_loss(h1)
    expected = out_b["ssl_loss"] + 1.0 * variance + 0.04 * covariance
    assert torch.allclose(out_w["ssl_loss"], expected, atol=1e-5)
    assert torch.allclose(out_w["byol_loss"], out_b["ssl_loss"], atol=1e-6)
    assert out_w["variance_loss"] > 0

    # The extra terms act on the backbone only: the heads get BYOL's gradients exactly.
    whitening.zero_grad(set_to_none=True)
    byol.zero_grad(set_to_none=True)
    out_w["loss"].backward()
    out_b["loss"].backward()
    for head in ("projection_head", "prediction_head"):
        for p, q in zip(getattr(whitening, head).parameters(), getattr(byol, head).parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6)
    differs = [not torch.allclose(p.grad, q.grad, atol=1e-6)
               for p, q in zip(whitening.backbone.parameters(), byol.backbone.parameters())]
    assert any(differs)


def test_parameter_groups_leave_out_targets_and_undecay_norms():
    method = make_method("byol")
    decay, no_decay = method.parameter_groups(weight_decay=1e-5)
    grouped = {id(p) for g in (decay, no_decay) for p in g["params"]}
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert grouped == trainable
    assert no_decay["weight_decay"] == 0.0
    bn_weights = {id(m.weight) for m in method.backbone.modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_weights <= {id(p) for p in no_decay["params"]}
    target = {id(p) for p in method.target_backbone.parameters()}
    assert not target & grouped


def test_a_deep_copy_regularizes_its_own_backbone():
    method = make_method("simclr", regularizer="so")
    clone = copy.deepcopy(method)
    before = method.or_term().item()
    with torch.no_grad():
        for _, w in regularized_weights(clone.backbone):
            w.mul_(2.0)
    assert clone.or_term().item() > 2 * before
    assert method.or_term().item() == before


def test_memory_bank_without_host_sync_writes_what_lightlys_writes() -> None:
    """The enqueue that keeps the write pointer on the host fills the bank and moves the pointer
    exactly as lightly's (wrap-around included), and reads the pointer again after a
    ``load_state_dict`` or a ``.to``."""
    from lightly.models.modules.memory_bank import MemoryBankModule

    from or_core.methods.base import persistent_memory_bank

    torch.manual_seed(0)
    ours = persistent_memory_bank(MemoryBankModule(size=(10, 3), feature_dim_first=False))
    reference = MemoryBankModule(size=(10, 3), feature_dim_first=False)
    reference.bank.copy_(ours.bank)
    g = torch.Generator().manual_seed(1)
    states = []
    for n in [4, 4, 4, 3, 5, 2]:
        batch = torch.randn(n, 3, generator=g)
        out_ours, bank_ours = ours(batch, update=True)
        out_ref, bank_ref = reference(batch, update=True)
        assert torch.equal(bank_ours, bank_ref)  # content from before this push
        assert torch.equal(ours.bank, reference.bank) and torch.equal(ours.bank_ptr, reference.bank_ptr)
        states.append({k: v.clone() for k, v in ours.state_dict().items()})
    ours.load_state_dict(states[0])  # the pointer the host mirrored (now 4) is stale
    reference.bank_ptr.copy_(states[0]["bank_ptr"])
    reference.bank.copy_(states[0]["bank"])
    batch = torch.randn(3, 3, generator=g)
    ours(batch, update=True), reference(batch, update=True)
    assert torch.equal(ours.bank, reference.bank) and int(ours.bank_ptr) == int(reference.bank_ptr) == 7
    ours.bank_ptr = torch.tensor([2])  # a new tensor: read again
    ours(batch[:2], update=True)
    assert int(ours.bank_ptr) == 4


def test_counters_are_mirrored_on_the_host_and_read_again_when_changed_elsewhere() -> None:
    from or_core.fast_path.host_counters import read_counter, write_counter

    module = nn.Module()
    module.register_buffer("count", torch.zeros((), dtype=torch.long))
    assert read_counter(module, "count") == 0
    write_counter(module, "count", 7)
    assert int(module.count) == read_counter(module, "count") == 7
    module.count += 2  # changed in place by other code: the mirror is not trusted
    assert read_counter(module, "count") == 9
    module.load_state_dict({"count": torch.tensor(3)})
    assert read_counter(module, "count") == 3
