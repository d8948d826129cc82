"""Backbones: output shapes, stems, widths, and what the orthogonality regularizer sees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from or_core import OrthogonalityRegularizer, regularized_weights
from or_core.backbones import BACKBONE_NAMES, build_backbone


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "feature_dim"),
    [  # ResNets pool globally: a small input keeps the test fast whatever the stem
        ("resnet18", {"image_size": 32}, 16, 512),
        ("resnet18", {"image_size": 64, "stem": "imagenet"}, 64, 512),
        ("resnet50", {"image_size": 32}, 8, 2048),
        ("resnet50", {"image_size": 96}, 32, 2048),
        ("resnet18", {"image_size": 32, "width": 0.25}, 32, 128),
        ("resnet50", {"image_size": 32, "width": 0.25}, 16, 512),
        ("vit_tiny", {"image_size": 32}, 32, 192),
        ("vit_small", {"image_size": 32}, 32, 384),
        ("vit_base", {"image_size": 32}, 32, 768),
    ],
)
def test_output_shape_and_feature_dim(name, kwargs, size, feature_dim):
    backbone, dim = build_backbone(name, **kwargs)
    assert dim == feature_dim
    with torch.no_grad():
        features = backbone.eval()(torch.randn(2, 3, size, size))
    assert features.shape == (2, feature_dim)


def test_stem_follows_image_size():
    small, _ = build_backbone("resnet18", image_size=32)
    large, _ = build_backbone("resnet18", image_size=224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    forced, _ = build_backbone("resnet18", image_size=32, stem="imagenet")
    assert forced.conv1.kernel_size == (7, 7)


def test_width_scales_every_stage():
    backbone, dim = build_backbone("resnet18", image_size=32, width=0.25)
    assert backbone.conv1.out_channels == 16
    stage_out = [getattr(backbone, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)]
    assert stage_out == [16, 32, 64, 128] and dim == 128
    tiny, tiny_dim = build_backbone("resnet18", image_size=32, width=0.001)
    assert tiny.conv1.out_channels == 1 and tiny_dim == 1


def test_resnet_classifier_is_gone():
    backbone, _ = build_backbone("resnet18", image_size=32)
    assert isinstance(backbone.fc, nn.Identity)
    assert not any(isinstance(m, nn.Linear) for m in backbone.modules())


def test_resnet18_has_exactly_20_regularized_conv_weights():
    backbone, _ = build_backbone("resnet18", image_size=32)
    selected = regularized_weights(backbone)
    assert len(selected) == 20
    conv_weights = {id(m.weight) for m in backbone.modules() if isinstance(m, nn.Conv2d)}
    assert {id(w) for _, w in selected} == conv_weights


def test_regularizer_gives_gradients_to_every_selected_weight():
    backbone, _ = build_backbone("resnet18", image_size=32, width=0.25)
    penalty = OrthogonalityRegularizer(backbone, kind="so", gamma=1.0)()
    assert penalty.ndim == 0 and torch.isfinite(penalty) and penalty > 0
    penalty.backward()
    for weight_name, weight in regularized_weights(backbone):
        assert weight.grad is not None and weight.grad.abs().sum() > 0, weight_name


def test_regularizer_sees_the_vit_projections():
    backbone, _ = build_backbone("vit_tiny", image_size=32)
    regularizer = OrthogonalityRegularizer(backbone, kind="srip")
    names = regularizer.names
    assert "conv_proj.weight" in names
    assert sum(n.endswith("self_attention.in_proj_weight") for n in names) == 12
    assert sum(n.endswith("self_attention.out_proj.weight") for n in names) == 12
    assert sum(".mlp." in n for n in names) == 24 and len(names) == 49
    with torch.no_grad():
        assert torch.isfinite(regularizer())


def test_vit_patch_size_depends_on_image_size():
    small, _ = build_backbone("vit_tiny", image_size=32)
    large, _ = build_backbone("vit_tiny", image_size=224)
    assert small.patch_size == 4 and small.seq_length == 8 * 8 + 1
    assert large.patch_size == 16 and large.seq_length == 14 * 14 + 1


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'") as info:
        build_backbone("resnet19")
    assert all(name in str(info.value) for name in BACKBONE_NAMES)
    with pytest.raises(ValueError, match="not a multiple of patch"):
        build_backbone("vit_tiny", image_size=30)
    with pytest.raises(ValueError, match="stem"):
        build_backbone("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=0)
    with pytest.raises(ValueError, match="ResNets only"):
        build_backbone("vit_small", image_size=32, width=0.5)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small"])
def test_vit_at_its_own_size_is_torchvisions_vit_and_takes_smaller_crops(name):
    """At the built size the patch grid's position embeddings are used as they are (the resize to
    the same grid is the identity), so the size-agnostic path equals torchvision's forward; a
    16 px multi-crop view gets features of the same dimension."""
    torch.manual_seed(0)
    backbone, dim = build_backbone(name, image_size=32)
    backbone.eval()
    side = 32 // backbone.patch_size
    assert torch.equal(backbone._position_embedding(side, side), backbone.encoder.pos_embedding)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = backbone(x)
        general = backbone._forward_any_size(x)  # the path of other sizes, on 32 px images
        local = backbone(torch.randn(3, 3, 16, 16))
    torch.testing.assert_close(general, reference)
    assert local.shape == (3, dim) and torch.isfinite(local).all()
    with pytest.raises(ValueError, match="multiple of the patch"):
        backbone(torch.randn(1, 3, 18, 18))


def test_vit_base_is_torchvisions_vit_b_16_without_its_head():
    """At 224 px (patch 16) ViT-base has exactly the parameters of torchvision's ViT-B/16 encoder,
    name for name and shape for shape; the OR term covers its patch embedding, every block's qkv
    and attention output projections and both MLP layers (12 x 4 + 1 = 49 weights)."""
    import torchvision

    backbone, dim = build_backbone("vit_base", image_size=224)
    reference = torchvision.models.vit_b_16()
    shapes = {k: v.shape for k, v in backbone.state_dict().items()}
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("heads.")}
    assert dim == 768 and shapes == expected
    names = [n for n, _ in regularized_weights(backbone)]
    assert len(names) == 49 and names[0] == "conv_proj.weight"
    block = [n[len("encoder.layers.encoder_layer_0."):] for n in names if n.startswith("encoder.layers.encoder_layer_0.")]
    assert sorted(block) == sorted(
        ["self_attention.in_proj_weight", "self_attention.out_proj.weight", "mlp.0.weight", "mlp.3.weight"]
    )
