"""Projection and prediction heads."""

from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Sequential):
    """``num_layers`` linear layers; hidden layers use BatchNorm and ReLU (SimCLR's projection head).

    ``last_bn=True`` ends with a BatchNorm without affine parameters, as in SimCLR v2 / MoCo v3 heads.
    ``hidden_bn=False`` drops the hidden BatchNorms (MoCo v2's head: linear, ReLU, linear).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        last_bn: bool = False,
        hidden_bn: bool = True,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"MLPHead needs at least one layer, got num_layers={num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            followed_by_bn = last_bn if last else hidden_bn
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not followed_by_bn))
            if not last:
                if hidden_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)


class DenseProjectionHead(nn.Sequential):
    """DenseCL's dense projection head (Wang et al. 2021, sec. 3.2): MoCo v2's MLP as 1x1 convolutions (conv, ReLU,
    conv) applied at every location of a (B, C, H, W) feature map; returns (B, out_dim, H * W)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(feature_map).flatten(2)
