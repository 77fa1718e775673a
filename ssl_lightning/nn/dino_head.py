"""DINO's projection head (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
sec. 3.1 and appendix C): an MLP to a bottleneck, L2 normalization, a weight-normalized last layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """``num_layers`` linear layers with GELU from ``in_dim`` through ``hidden_dim`` to ``bottleneck_dim``, L2
    normalization, then a weight-normalized linear layer without bias to ``out_dim`` (K). ``use_bn`` puts a
    BatchNorm after each hidden linear layer (the reference code's ``use_bn_in_head``, off for ViTs; it spreads
    the samples of a batch apart, which small ConvNets need against a uniform teacher).

    The last layer's weight is ``g * v / ||v||`` per output row (``torch.nn.utils.parametrizations.weight_norm``)
    with ``g`` starting at 1; ``norm_last_layer`` keeps ``g`` fixed at 1 (unit-norm rows, no gradient), which
    the paper finds stabilizes training. ``last_layer`` is what DINO freezes during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs at least one layer before the last one, got num_layers={num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(dims[i + 1]), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):  # the reference code's init: truncated normal, zero bias
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0  # g, one entry per output row
        with torch.no_grad():
            scale.fill_(1.0)
        scale.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
