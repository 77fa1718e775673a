"""Backbone registry: a name gives an ``nn.Module`` that maps images to pooled features.

Every backbone exposes ``feature_dim``. ResNets follow torchvision's layout and parameter names
(He et al. 2016), optionally with the CIFAR stem (3x3 conv, stride 1, no max-pool) and a base-width
multiplier; ViTs come from timm (Dosovitskiy et al. 2021).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

_RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
_VITS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


class ResNetTrunk(nn.Module):
    """torchvision's ResNet without ``fc``, with a configurable base width and stem.

    With ``base_width=64`` and the ImageNet stem its ``state_dict`` keys and shapes are those of
    ``torchvision.models.resnetXX`` minus ``fc``. ``feature_map(x)`` gives the last stage's spatial
    features before pooling (``feature_dim`` channels, ``feature_stride`` times smaller than the input),
    for methods that decode pixels (colorization, inpainting).
    """

    def __init__(self, block: type[nn.Module], layers: list[int], base_width: int = 64, cifar_stem: bool = False) -> None:
        super().__init__()
        self.inplanes = base_width
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, base_width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = base_width * 8 * block.expansion
        self.feature_stride = 8 if cifar_stem else 32
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, feature_dim, ceil(H / feature_stride), ceil(W / feature_stride))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)


class TimmViT(nn.Module):
    """A timm Vision Transformer returning the pooled (class-token) feature.

    ``dynamic_img_size`` (on by default) lets it take images of another size than ``image_size`` (sides
    multiples of ``patch_size``) by interpolating the position embeddings, as multi-crop's small local crops
    need (Caron et al. 2021); at ``image_size`` the output is unchanged.
    """

    def __init__(
        self,
        timm_name: str,
        image_size: int = 224,
        patch_size: int = 16,
        dynamic_img_size: bool = True,
        **timm_kwargs: object,
    ) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            img_size=image_size,
            patch_size=patch_size,
            dynamic_img_size=dynamic_img_size,
            **timm_kwargs,
        )
        self.feature_dim: int = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _resnet_builder(name: str, cifar_stem: bool) -> Callable[..., nn.Module]:
    block, layers = _RESNET_LAYOUTS[name]

    def build(base_width: int = 64) -> nn.Module:
        return ResNetTrunk(block, layers, base_width=base_width, cifar_stem=cifar_stem)

    return build


def _vit_builder(timm_name: str) -> Callable[..., nn.Module]:
    def build(image_size: int = 224, patch_size: int = 16, **timm_kwargs: object) -> nn.Module:
        return TimmViT(timm_name, image_size=image_size, patch_size=patch_size, **timm_kwargs)

    return build


# ViT-Ti/S/B/L sizes (embed_dim, depth, num_heads) for MAE's encoder (He et al. 2022), which can run on visible patches only
_MAE_VITS = {
    "mae_vit_tiny": (192, 12, 3),
    "mae_vit_small": (384, 12, 6),
    "mae_vit_base": (768, 12, 12),
    "mae_vit_large": (1024, 24, 16),
}


def _mae_vit_builder(embed_dim: int, depth: int, num_heads: int) -> Callable[..., nn.Module]:
    def build(**kwargs: object) -> nn.Module:
        from ssl_lightning.nn.vit_mae import MaskedViTEncoder

        return MaskedViTEncoder(**{"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **kwargs})

    return build


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: _resnet_builder(name, cifar_stem=False) for name in _RESNET_LAYOUTS},
    **{f"cifar_{name}": _resnet_builder(name, cifar_stem=True) for name in _RESNET_LAYOUTS},
    **{name: _vit_builder(timm_name) for name, timm_name in _VITS.items()},
    **{name: _mae_vit_builder(*size) for name, size in _MAE_VITS.items()},
}


def build_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build the backbone registered under ``name`` (see ``BACKBONES``) with its keyword arguments."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}")
    try:
        return BACKBONES[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"backbone {name!r}: bad arguments {kwargs}: {err}") from err
