"""The optimizer recipes as their sources write them: which recipe a run gets (CIFAR, ImageNet-100,
ImageNet-1k, ViT), what ``build_optimizer`` makes of it, DINO's weight-decay schedule and
gradient clipping applied by ``optimization_step``, and the multi-crop defaults of DINO and SwaV.

No data and no GPU: the methods run on a tiny CNN (a ViT-tiny for DINO's ViT recipe).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from or_core.config import PretrainConfig, resolve_config
from or_core.lars import LARS
from or_core.methods import SSLMethod, available_methods, build_method
from or_core.methods.base import OptimizerDefaults, clip_gradients, recipe_key, schedule_weight_decay
from or_core.optim import build_optimizer
from or_core.train import optimization_step
from or_core.training_run import Run

# lightly's DINO head uses the deprecated torch.nn.utils.weight_norm.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_HEADS = {
    "byol": dict(pred_hidden_dim=32), "byol_whitening": dict(pred_hidden_dim=32), "dino": dict(num_prototypes=64),
    "mocov2": dict(queue_size=64), "nnclr": dict(pred_hidden_dim=32, queue_size=64), "simsiam": dict(pred_hidden_dim=16),
    "swav": dict(num_prototypes=32, queue_length=32),
    "all4one": dict(pred_hidden_dim=32, queue_size=64), "deepclusterv2": dict(num_prototypes=(8,), num_samples=64),
    "mocov3": dict(pred_hidden_dim=32), "nnbyol": dict(pred_hidden_dim=32, queue_size=64),
    "nnsiam": dict(pred_hidden_dim=16, queue_size=64), "ressl": dict(queue_size=64),
}


class TinyNet(nn.Module):
    """Conv and linear weights, batch norm, biases: every kind of parameter the groups sort."""

    def __init__(self, feature_dim: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, feature_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def tiny_method(name: str, backbone: nn.Module | None = None, feature_dim: int = 16, **kwargs) -> SSLMethod:
    torch.manual_seed(0)
    args = dict(proj_hidden_dim=32, proj_output_dim=16, **SMALL_HEADS.get(name, {}))
    args.update(kwargs)
    return build_method(name, backbone if backbone is not None else TinyNet(feature_dim), feature_dim, **args)


def config(**values) -> PretrainConfig:
    return PretrainConfig(**{"data_root": "/nonexistent", **values})


def lars_settings(optimizer: torch.optim.Optimizer) -> dict:
    decayed = optimizer.param_groups[0]
    return {k: decayed[k] for k in ("lr", "weight_decay", "trust_coefficient", "clip_lr", "exclude_bias_n_norm")}


# ----------------------------------------------------------------------------------------------
# Which recipe, and what build_optimizer makes of it
# ----------------------------------------------------------------------------------------------
def test_recipe_keys() -> None:
    assert recipe_key("resnet18", None) == recipe_key("resnet18", 32) == recipe_key("resnet50", 64) == "cifar"
    assert recipe_key("resnet50", 224) == "imagenet" and recipe_key("resnet18", 224) == "imagenet-100"
    assert recipe_key("vit_tiny", 32) == recipe_key("vit_small", 224) == "vit"
    byol = build_method("byol", TinyNet(), 16).__class__
    assert byol.optimizer_defaults("resnet18", 32) is byol.default_optimizer
    assert byol.optimizer_defaults("vit_tiny", 32) is byol.default_optimizer  # no ViT recipe: the CIFAR one
    simclr = build_method("simclr", TinyNet(), 16).__class__
    assert simclr.optimizer_defaults("resnet50", 224) is simclr.default_optimizer  # no ImageNet recipe


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # solo-learn scripts/pretrain/cifar/byol.yaml: lr 1.0 x 256/256, weight decay 1e-5, eta 0.02, clip_lr
        ("cifar10_resnet18_paper.yaml", dict(lr=1.0, weight_decay=1e-5, trust_coefficient=0.02, clip_lr=True)),
        # solo-learn scripts/pretrain/imagenet-100/byol.yaml: lr 0.5 x 256/256, weight decay 1e-6, eta 0.02, clip_lr
        ("imagenet100_resnet18.yaml", dict(lr=0.5, weight_decay=1e-6, trust_coefficient=0.02, clip_lr=True)),
        # lightly benchmarks/imagenet/resnet50/byol.py, solo-learn scripts/pretrain/imagenet/byol.yaml:
        # lr 0.45 x 128/256, weight decay 1e-6, eta 0.001, no clip_lr
        ("imagenet_resnet50_byol.yaml", dict(lr=0.225, weight_decay=1e-6, trust_coefficient=0.001, clip_lr=False)),
    ],
)
def test_byol_configs_get_their_sources_lars_recipe(path: str, expected: dict) -> None:
    cfg = resolve_config("gpu", config_file=CONFIGS / path, overrides={"method": "byol"})
    optimizer = build_optimizer(tiny_method("byol"), cfg)
    assert isinstance(optimizer, LARS)
    settings = lars_settings(optimizer)
    assert settings.pop("exclude_bias_n_norm") is True
    assert settings == pytest.approx(expected, rel=1e-12)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    # the numbers: at batch 128 the CIFAR recipe's lr x eta is 44x the ImageNet one's
    if path == "imagenet_resnet50_byol.yaml":
        cifar = config(method="byol", backbone="resnet50", batch_size=128)  # no image_size: CIFAR-scale
        old = lars_settings(build_optimizer(tiny_method("byol"), cifar))
        assert old["lr"] * old["trust_coefficient"] / (settings["lr"] * settings["trust_coefficient"]) == pytest.approx(400 / 9)


@pytest.mark.parametrize("name", available_methods())
def test_groups_put_exactly_the_one_dimensional_parameters_out_of_lars(name: str) -> None:
    """build_optimizer's groups for every method's recipe: biases and norms (and nothing else)
    in the group without weight decay, all of them one-dimensional, every other trainable
    parameter decayed; so lightly's rule (no adaptation without weight decay) and solo-learn's
    exclude_bias_n_norm (no adaptation for 1-D parameters) pick the same parameters, and the
    update is solo-learn's (tests/test_lars.py). No EMA target or frozen parameter is in them."""
    method = tiny_method(name)
    optimizer = build_optimizer(method, config(method=name, optimizer="lars"))
    decayed, undecayed = optimizer.param_groups
    assert all(p.ndim != 1 for p in decayed["params"]) and all(p.ndim == 1 for p in undecayed["params"])
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)
    # clip_lr as the recipe says: on in solo-learn's CIFAR recipes but VIbCReg's, which leaves it off
    assert decayed["clip_lr"] == method.default_optimizer.clip_lr
    assert decayed["exclude_bias_n_norm"] and decayed["trust_coefficient"] == 0.02


def test_a_recipe_without_bias_and_norm_exclusion_decays_and_adapts_everything() -> None:
    class Everything(SSLMethod):
        name = "everything"
        default_optimizer = OptimizerDefaults(name="lars", lr=0.1, weight_decay=1e-4, exclude_bias_and_norm=False)

    method = Everything(TinyNet(), 16)
    (group,) = build_optimizer(method, config()).param_groups
    assert group["weight_decay"] == 1e-4 and not group["exclude_bias_n_norm"]
    assert len(group["params"]) == len(list(method.parameters()))


@pytest.mark.parametrize("name", available_methods())
def test_the_cpu_profile_keeps_sgd_with_constant_weight_decay_and_no_clipping(name: str) -> None:
    """The cpu profile (SGD, weight decay 5e-4) is unchanged: the same two groups as before, no
    weight-decay schedule, no clipping, for every method (DINO's ResNet recipe has neither)."""
    cfg = resolve_config("cpu", overrides={"method": name})
    optimizer = build_optimizer(tiny_method(name), cfg)
    assert type(optimizer) is torch.optim.SGD
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and undecayed["weight_decay"] == 0.0
    assert decayed["lr"] == cfg.lr
    assert all("weight_decay_end" not in g and "clip_grad" not in g for g in optimizer.param_groups)


# ----------------------------------------------------------------------------------------------
# DINO's ViT recipe: weight decay 0.04 -> 0.4 on a cosine, gradients clipped to norm 3
# ----------------------------------------------------------------------------------------------
def bare_run(cfg: PretrainConfig, method: SSLMethod, total_steps: int) -> Run:
    """What optimization_step needs of a run, without data: method, optimizer, schedule."""
    from lightly.utils.scheduler import CosineWarmupScheduler

    optimizer = build_optimizer(method, cfg)
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=0, max_epochs=total_steps)
    return Run(  # type: ignore[arg-type]
        cfg=cfg, device=torch.device("cpu"), method=method, augment=None, optimizer=optimizer, scheduler=scheduler,
        train=None, steps_per_epoch=total_steps, mean=(), std=(),
    )


def dino_vit() -> SSLMethod:
    from or_core.backbones import build_backbone

    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("vit_tiny", image_size=16)
    return tiny_method("dino", backbone, feature_dim)


def test_dino_vit_weight_decay_follows_dinos_cosine_schedule_over_the_steps() -> None:
    """Through optimization_step: the decayed group's weight decay at step t of T is DINO's
    utils.cosine_scheduler(0.04, 0.4), ``0.4 + 0.5 (0.04 - 0.4) (1 + cos(pi t / T))``, the
    undecayed group stays at 0; the schedule survives a state-dict round trip (resume), and a
    weight decay given in the config is constant."""
    method = dino_vit()
    cfg = config(method="dino", backbone="vit_tiny", amp=False, batch_size=256)
    total = 8
    run = bare_run(cfg, method, total)
    assert isinstance(run.optimizer, torch.optim.AdamW)
    assert run.optimizer.param_groups[0]["initial_lr"] == pytest.approx(5e-4)  # 5e-4 x 256/256
    views = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    seen = []
    for step in range(total):
        optimization_step(run, views, step / total)
        decayed, undecayed = run.optimizer.param_groups
        seen.append(decayed["weight_decay"])
        assert undecayed["weight_decay"] == 0.0
    expected = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert seen[0] == pytest.approx(0.04)  # and 0.4 at the end of training:
    schedule_weight_decay(run.optimizer, 1.0)
    assert run.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.4)

    resumed = build_optimizer(dino_vit(), cfg)
    resumed.load_state_dict(run.optimizer.state_dict())
    schedule_weight_decay(resumed, 0.5)
    assert resumed.param_groups[0]["weight_decay"] == pytest.approx(0.22)

    constant = build_optimizer(method, config(method="dino", backbone="vit_tiny", weight_decay=0.05))
    schedule_weight_decay(constant, 0.9)
    assert constant.param_groups[0]["weight_decay"] == 0.05


def test_clip_gradients_scales_a_large_gradient_to_the_norm_and_leaves_small_ones() -> None:
    """DINO's utils.clip_gradients: g * min(3 / (||g|| + 1e-6), 1) per parameter. A gradient of
    norm 100 comes out with norm 3 * 100 / (100 + 1e-6) (float32: within 1e-6 relative, a few
    ulp); one of norm 0.5 is left bit for bit; a group without clip_grad is untouched."""
    big = nn.Parameter(torch.zeros(4, 25))
    small = nn.Parameter(torch.zeros(10))
    other = nn.Parameter(torch.zeros(3))
    big.grad = torch.full_like(big, 10.0)  # norm 100
    small.grad = torch.full((10,), 0.5 / math.sqrt(10))
    other.grad = torch.full((3,), 1e3)
    optimizer = torch.optim.SGD([{"params": [big, small], "clip_grad": 3.0}, {"params": [other]}], lr=0.1)
    small_before, other_before = small.grad.clone(), other.grad.clone()
    clip_gradients(optimizer)
    assert big.grad.norm().item() == pytest.approx(3.0 * 100 / (100 + 1e-6), rel=1e-6)
    assert torch.allclose(big.grad, torch.full_like(big, 10.0 * 3.0 / (100 + 1e-6)))
    assert torch.equal(small.grad, small_before) and torch.equal(other.grad, other_before)


def test_optimization_step_clips_the_gradients_of_a_recipe_with_clip_grad() -> None:
    """A method whose recipe sets clip_grad 3.0 and whose loss gives gradients far above it: at
    the optimizer's step every gradient has norm at most 3 (and the largest about 3); DINO's ViT
    recipe carries clip_grad 3.0 into every parameter group."""

    class Loud(SSLMethod):
        name = "loud"
        default_optimizer = OptimizerDefaults(name="sgd", lr=0.01, weight_decay=0.0, clip_grad=3.0)

        def ssl_loss(self, views, progress):
            return 1e4 * self.features(views[0]).pow(2).mean()

    torch.manual_seed(0)
    method = Loud(TinyNet(), 16)
    run = bare_run(config(amp=False), method, 4)
    norms: list[float] = []

    def record_norms(optimizer, args, kwargs) -> None:
        norms.extend(p.grad.norm().item() for g in optimizer.param_groups for p in g["params"] if p.grad is not None)

    run.optimizer.register_step_pre_hook(record_norms)
    views = [torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))] * 2
    method.zero_grad()
    method.training_loss(views, 0.0)["loss"].backward()
    assert max(p.grad.norm().item() for p in method.parameters()) > 30  # far above the clip
    optimization_step(run, views, 0.0)
    # float32: 3 * n / (n + 1e-6) rounds to within an ulp of 3 (2.4e-7), above or below
    assert norms and max(norms) <= 3.0 * (1 + 1e-6) and max(norms) == pytest.approx(3.0, rel=1e-6)

    dino = build_optimizer(dino_vit(), config(method="dino", backbone="vit_tiny"))
    assert all(g["clip_grad"] == 3.0 for g in dino.param_groups)
    assert dino.param_groups[0]["weight_decay_start"] == 0.04 and dino.param_groups[0]["weight_decay_end"] == 0.4
    resnet = build_optimizer(tiny_method("dino"), config(method="dino"))  # solo-learn's CIFAR recipe: neither
    assert all("clip_grad" not in g and "weight_decay_end" not in g for g in resnet.param_groups)


# ----------------------------------------------------------------------------------------------
# Multi-crop defaults of DINO and SwaV
# ----------------------------------------------------------------------------------------------
def test_dino_and_swav_defaults_are_solo_learns_two_crop_cifar_recipes() -> None:
    """solo-learn scripts/pretrain/cifar/dino.yaml and swav.yaml: two 32 px crops and no local
    crops; DINO's teacher temperature 0.07 from the start (no warmup epochs in that yaml)."""
    dino = tiny_method("dino")
    swav = tiny_method("swav")
    assert dino.num_local_views == 0 and swav.num_local_views == 0
    assert dino.teacher_temperature(0.0) == dino.teacher_temperature(1.0) == 0.07
    assert dino.criterion.student_temp == 0.1 and dino.base_momentum == 0.9995


def test_the_vit_dino_config_takes_multi_crop_head_and_optimizer_from_dinos_main_dino() -> None:
    cfg = resolve_config("gpu", config_file=CONFIGS / "cifar100_vit_dino.yaml")
    kwargs = cfg.method_kwargs
    assert kwargs["num_local_views"] == 8 and kwargs["num_prototypes"] == 65536
    assert kwargs["warmup_teacher_temp"] == kwargs["teacher_temp"] == 0.04 and kwargs["warmup_teacher_temp_progress"] == 0
    recipe = build_method("dino", TinyNet(), 16, num_prototypes=64).optimizer_defaults(cfg.backbone, cfg.image_size)
    assert (recipe.name, recipe.lr, recipe.weight_decay, recipe.weight_decay_end, recipe.clip_grad) == ("adamw", 5e-4, 0.04, 0.4, 3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clipping_and_the_weight_decay_schedule_never_synchronize_on_cuda() -> None:
    params = [nn.Parameter(torch.zeros(64, 64, device="cuda")), nn.Parameter(torch.zeros(64, device="cuda"))]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    optimizer = torch.optim.AdamW(
        [{"params": params, "clip_grad": 3.0, "weight_decay": 0.04, "weight_decay_start": 0.04, "weight_decay_end": 0.4}]
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_gradients(optimizer)
        schedule_weight_decay(optimizer, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert max(p.grad.norm().item() for p in params) <= 3.0 * (1 + 1e-6)
