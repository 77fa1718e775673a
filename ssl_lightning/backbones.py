"""Backbone registry: a name gives an ``nn.Module`` that maps images to pooled features.

Every backbone exposes ``feature_dim``. ResNets follow torchvision's layout and parameter names
(He et al. 2016), optionally with the CIFAR stem (3x3 conv, stride 1, no max-pool) and a base-width
multiplier; ViTs (Dosovitskiy et al. 2021) and ConvNeXts (Liu et al. 2022) come from timm.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

_RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
_VITS = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}

# ConvNeXt sizes in timm (Liu et al. 2022; atto/femto/pico/nano from timm, for small budgets)
_CONVNEXTS = ("convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny", "convnext_small",
              "convnext_base")


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
    """A timm Vision Transformer returning the pooled feature (the class token, or the mean patch token with
    ``global_pool="avg"``), with token-level access for masked and distillation methods.

    ``dynamic_img_size`` (on by default) lets it take images of another size than ``image_size`` (sides
    multiples of ``patch_size``) by interpolating the position embeddings, as multi-crop's small local crops
    need (Caron et al. 2021); at ``image_size`` the output is unchanged. timm's own options pass through
    ``timm_kwargs``: ``reg_tokens`` (Darcet et al. 2024), ``init_values`` (LayerScale, Touvron et al. 2021),
    ``drop_path_rate``, ``class_token``, ``global_pool``.

    Token-level API (``forward(x) == pool(encode(embed(x)))``):
      ``embed(images, mask, mask_token)``: prefix tokens ([CLS], registers) then patch tokens, positions added;
        masked patches replaced by ``mask_token`` before the positions (iBOT, SimMIM).
      ``keep_patches(tokens, indices)``: the prefix tokens and the patch tokens at ``indices`` (I-JEPA, MSN): the
        blocks never see the dropped patches.
      ``encode(tokens, attn_mask)``: the blocks (an optional attention mask, e.g. AIM's prefix-causal one) and
        the final norm.
      ``pool(tokens)``, ``class_token(tokens)``, ``patch_tokens(tokens)``.
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

        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
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
        self.embed_dim: int = self.model.embed_dim
        self.patch_size = patch_size
        self.num_prefix_tokens: int = self.model.num_prefix_tokens
        self.has_class_token: bool = self.model.cls_token is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch rows and columns of ``images`` (B, C, H, W); an error when the patch size does not divide them."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by the ViT's patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def embed(
        self, images: torch.Tensor, mask: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, num_prefix_tokens + N, D) with positions; ``mask`` (B, N) bool, True on
        patches whose embedding ``mask_token`` (D,) replaces (BEiT / iBOT / SimMIM masked image modelling)."""
        rows, cols = self.grid_size(images)
        x = self.model.patch_embed(images)  # (B, rows, cols, D) with dynamic_img_size, else (B, N, D)
        if mask is not None:
            if mask_token is None:
                raise ValueError("TimmViT.embed: a mask needs a mask_token")
            if tuple(mask.shape) != (images.shape[0], rows * cols):
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not match {images.shape[0]} images of "
                                 f"{rows}x{cols} patches")
            x = torch.where(mask.reshape(x.shape[:-1])[..., None], mask_token.to(x.dtype), x)
        return self.model.norm_pre(self.model.patch_drop(self.model._pos_embed(x)))

    def keep_patches(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The prefix tokens and the patch tokens at ``indices`` (B, n) of each image: (B, num_prefix + n, D)."""
        prefix, patches = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        kept = torch.gather(patches, 1, indices[..., None].expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, kept], dim=1)

    def encode(self, tokens: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The transformer blocks and the final norm over a token sequence (B, L, D); ``attn_mask`` (L, L) or
        (B, 1, L, L) (one per image, e.g. AIM's prefixes), bool (True where a query may attend to a key) or additive.
        With ``global_pool="avg"`` set ``fc_norm: false``: timm's default then moves the final norm after pooling."""
        for block in self.model.blocks:
            tokens = block(tokens) if attn_mask is None else block(tokens, attn_mask=attn_mask)
        return self.model.norm(tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled feature (B, feature_dim) of encoded tokens: what ``forward`` returns."""
        return self.model.forward_head(tokens, pre_logits=True)

    def class_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """The [CLS] output (B, D) of encoded tokens."""
        if not self.has_class_token:
            raise ValueError("this ViT has no class token (class_token=False)")
        return tokens[:, 0]

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch outputs (B, n, D) of encoded tokens (prefix tokens dropped)."""
        return tokens[:, self.num_prefix_tokens :]


class TimmConvNet(nn.Module):
    """A timm ConvNeXt without its classifier: ``forward`` gives the pooled, normed feature (timm's head before
    the fc), ``feature_map(x)`` the last stage's map (``feature_dim`` channels, ``feature_stride`` = 32 times
    smaller than the input), as ``ResNetTrunk``. timm's options (``dims``, ``depths``, ``drop_path_rate``) pass
    through."""

    def __init__(self, timm_name: str, **timm_kwargs: object) -> None:
        import timm

        super().__init__()
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
        self.feature_dim = int(self.model.num_features)
        self.feature_stride = int(self.model.feature_info[-1]["reduction"])

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.feature_map(x), pre_logits=True)


def require_vit(backbone: nn.Module, method: str, name: str) -> TimmViT:
    """``backbone`` if it is a timm ViT with token access; else one line naming the method and the backbone."""
    if not isinstance(backbone, TimmViT):
        raise ValueError(f"{method} needs a ViT backbone ({', '.join(_VITS)}), got backbone={name!r}")
    return backbone


def check_divisible(size: int, patch_size: int, setting: str) -> None:
    """One line naming ``setting`` when ``patch_size`` does not divide ``size`` (an image or crop side)."""
    if size % patch_size:
        raise ValueError(f"{setting}={size} is not divisible by the patch size {patch_size}")


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
    **{name: partial(TimmConvNet, name) for name in _CONVNEXTS},
}


def build_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build the backbone registered under ``name`` (see ``BACKBONES``) with its keyword arguments."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}")
    try:
        return BACKBONES[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"backbone {name!r}: bad arguments {kwargs}: {err}") from err
