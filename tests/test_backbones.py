"""Backbone registry: shapes, feature dims, torchvision compatibility, clear errors."""

import pytest
import torch
import torchvision

from ssl_lightning.backbones import build_backbone


@pytest.mark.parametrize(
    "name, kwargs, size, dim",
    [
        ("cifar_resnet18", {"base_width": 16}, 32, 128),
        ("cifar_resnet50", {"base_width": 8}, 32, 256),
        ("resnet34", {"base_width": 8}, 64, 64),
        ("vit_tiny", {"image_size": 32, "patch_size": 8}, 32, 192),
    ],
)
def test_pooled_features_have_feature_dim(name: str, kwargs: dict, size: int, dim: int) -> None:
    backbone = build_backbone(name, **kwargs).eval()
    assert backbone.feature_dim == dim
    assert backbone(torch.randn(2, 3, size, size)).shape == (2, dim)


def test_resnet50_matches_torchvision_layout() -> None:
    ours = build_backbone("resnet50").eval()
    reference = torchvision.models.resnet50()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(reference.eval()(x), ours(x))


def test_cifar_stem_keeps_resolution() -> None:
    backbone = build_backbone("cifar_resnet18", base_width=8)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, torch.nn.Identity)


def test_unknown_backbone_and_bad_argument_are_named() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'.*cifar_resnet18"):
        build_backbone("resnet19")
    with pytest.raises(TypeError, match="'resnet18'.*depth"):
        build_backbone("resnet18", depth=3)
