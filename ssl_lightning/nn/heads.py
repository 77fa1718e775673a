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


class AIMHead(nn.Module):
    """AIM's token-level prediction head (section 3, "MLP prediction heads"): a linear map to width ``dim``,
    ``num_blocks`` pre-norm residual MLP blocks (expansion ``mlp_ratio``, GELU), a LayerNorm and a linear map to
    the patch's pixels; every token independently. No biases in the linear layers, as the paper's trunk and head."""

    def __init__(self, in_dim: int, out_dim: int, dim: int = 2048, num_blocks: int = 12, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.proj_in = nn.Linear(in_dim, dim, bias=False)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))
            for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.proj_out(self.norm(x))
