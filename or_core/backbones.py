"""Encoders: ResNet-18/50 and ViT-tiny/small/base from torchvision, classifier removed.

:func:`build_backbone` returns ``(encoder, feature_dim)``; the encoder maps images
``(N, 3, H, W)`` to features ``(N, feature_dim)``.

* ResNets take the CIFAR stem for small images (a 3x3 stride-1 ``conv1`` and no max-pool, as in
  SimCLR's and solo-learn's CIFAR ResNets) and torchvision's ImageNet stem (7x7 stride 2 and a
  max-pool) otherwise. ``width`` scales every stage's channels (``64, 128, 256, 512`` times
  ``width``) for narrow CPU runs.
* ViTs are torchvision's ``VisionTransformer`` with patch 4 for images up to 64 px and patch 16
  above; the output is the class token after the final norm. Smaller images (multi-crop's
  local views) are taken too, with the position embeddings resized to their patch grid.

Every backbone works with :class:`or_core.OrthogonalityRegularizer`: its conv, linear and
attention projection weights are what :func:`or_core.regularized_weights` selects (ResNet-18:
20 convolutions, the classifier being gone).

Example::

    backbone, dim = build_backbone("resnet18", image_size=32)   # CIFAR stem, dim = 512
    features = backbone(torch.randn(8, 3, 32, 32))                # (8, 512)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

__all__ = ["BACKBONE_NAMES", "build_backbone"]

Stem = Literal["cifar", "imagenet"]

#: Images up to this side get the CIFAR stem (ResNet) and patch 4 (ViT) by default.
SMALL_IMAGE_SIZE = 64

_RESNETS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
#: ``(hidden_dim, num_layers, num_heads, mlp_dim)`` of DeiT's tiny and small ViTs and of ViT-B
#: (Dosovitskiy et al. 2021, Table 1), the three of the paper's Table 3.
_VITS: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny": (192, 12, 3, 768),
    "vit_small": (384, 12, 6, 1536),
    "vit_base": (768, 12, 12, 3072),
}
BACKBONE_NAMES: tuple[str, ...] = (*_RESNETS, *_VITS)


def build_backbone(
    name: str,
    *,
    image_size: int | None = None,
    stem: Stem | None = None,
    width: float = 1.0,
) -> tuple[nn.Module, int]:
    """Build an encoder without classifier; return ``(encoder, feature_dim)``.

    Args:
        name: ``"resnet18"``, ``"resnet50"``, ``"vit_tiny"``, ``"vit_small"`` or ``"vit_base"``.
        image_size: side of the input images. ResNets: picks the stem when ``stem`` is ``None``
            (CIFAR up to 64 px, ImageNet above or when unknown). ViTs: sets the position
            embeddings and the patch size (4 up to 64 px, else 16); ``None`` means 224.
        stem: ``"cifar"`` or ``"imagenet"`` to override the ResNet stem.
        width: ResNet channel multiplier; stage ``i`` has ``round(64 * 2**i * width)`` channels
            (at least 1), so ``feature_dim = round(512 * width) * expansion`` (1 for ResNet-18,
            4 for ResNet-50).

    Raises:
        ValueError: an unknown name or stem, a non-positive width, a width or stem given for a
            ViT, or an image size the ViT patch does not divide.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    key = name.lower()
    if key in _RESNETS:
        return _build_resnet(key, _resnet_stem(stem, image_size), width)
    if key in _VITS:
        if width != 1.0 or stem is not None:
            raise ValueError(
                f"{name}: width and stem apply to ResNets only (got width={width}, stem={stem}; "
                "the ci and cpu profiles set width 0.125: pass --width 1.0 with a ViT)"
            )
        return _build_vit(key, 224 if image_size is None else image_size)
    raise ValueError(f"unknown backbone {name!r}: use one of {', '.join(BACKBONE_NAMES)}")


# ----------------------------------------------------------------------------------------------
# ResNet
# ----------------------------------------------------------------------------------------------
def _resnet_stem(stem: str | None, image_size: int | None) -> Stem:
    if stem is None:
        small = image_size is not None and image_size <= SMALL_IMAGE_SIZE
        return "cifar" if small else "imagenet"
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    return stem  # type: ignore[return-value]


def _build_resnet(name: str, stem: Stem, width: float) -> tuple[nn.Module, int]:
    block, layers = _RESNETS[name]
    model = ResNet(block, layers)
    if width != 1.0:
        _set_width(model, block, layers, width)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        _init_like_torchvision(model.conv1)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model, _stage_channels(width)[-1] * block.expansion


def _stage_channels(width: float) -> list[int]:
    """Output channels of the stem and the four stages (before a Bottleneck's expansion)."""
    return [max(1, round(64 * 2**i * width)) for i in range(4)]


def _set_width(model: ResNet, block: type, layers: list[int], width: float) -> None:
    """Rebuild ``model``'s stem and stages with ``64 * 2**i * width`` channels.

    torchvision's ``ResNet`` fixes 64 stem channels and builds each stage from ``inplanes``,
    which its ``_make_layer`` keeps up to date; setting ``inplanes`` and calling ``_make_layer``
    with scaled ``planes`` is torchvision's own way of building the stages. (``width_per_group``
    only widens a Bottleneck's inner 3x3 conv, not the stages.)
    """
    channels = _stage_channels(width)
    model.inplanes = channels[0]
    model.conv1 = nn.Conv2d(3, channels[0], 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(channels[0])
    model.layer1 = model._make_layer(block, channels[0], layers[0])
    for i, stage in enumerate(("layer2", "layer3", "layer4"), start=1):
        setattr(model, stage, model._make_layer(block, channels[i], layers[i], stride=2))
    model.apply(_init_like_torchvision)


def _init_like_torchvision(module: nn.Module) -> None:
    """The initialization of torchvision's ``ResNet.__init__``, for rebuilt modules."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(module.weight, 1)
        nn.init.constant_(module.bias, 0)


# ----------------------------------------------------------------------------------------------
# Vision Transformer
# ----------------------------------------------------------------------------------------------
def _vit_patch_size(image_size: int) -> int:
    return 4 if image_size <= SMALL_IMAGE_SIZE else 16


class _ViT(VisionTransformer):
    """torchvision's ViT that also takes other image sizes than the one it was built for.

    Images of the built size go through torchvision's forward unchanged. Other sizes (the small
    local crops of DINO's and SwAV's multi-crop, e.g. 16 px crops of 32 px images) get the patch
    position embeddings resized bicubically to their patch grid, as in the DINO paper; the class
    token's embedding is kept. Sides must be multiples of the patch size.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == x.shape[-1] == self.image_size:
            return super().forward(x)
        return self._forward_any_size(x)

    def _forward_any_size(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"ViT with patch {p}: image size {h}x{w} is not a multiple of the patch")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, h/p * w/p, D)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        encoder = self.encoder
        hidden = encoder.dropout(tokens + self._position_embedding(h // p, w // p))
        return self.heads(encoder.ln(encoder.layers(hidden))[:, 0])

    def _position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """``(1, 1 + rows * cols, D)``: the class token's embedding, then the patch grid's resized."""
        embedding = self.encoder.pos_embedding
        side = self.image_size // self.patch_size
        grid = embedding[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([embedding[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


def _build_vit(name: str, image_size: int) -> tuple[nn.Module, int]:
    hidden_dim, num_layers, num_heads, mlp_dim = _VITS[name]
    patch_size = _vit_patch_size(image_size)
    if image_size % patch_size:
        raise ValueError(f"{name}: image_size {image_size} is not a multiple of patch {patch_size}")
    model = _ViT(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
    )
    model.heads = nn.Identity()
    return model, hidden_dim
