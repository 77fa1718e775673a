"""Fixed 2D sine-cosine position embeddings (Vaswani et al. 2017, as used by MAE, He et al. 2022).

Follows MAE's ``get_2d_sincos_pos_embed``: the first half of the channels encodes the patch's column,
the second half its row; each half is ``[sin(pos * w_k), cos(pos * w_k)]`` with
``w_k = 10000 ** (-k / (D/4))``, ``k = 0 .. D/4 - 1``. Patches are numbered row-major.
"""

from __future__ import annotations

import torch


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N, dim) embedding of the float ``positions`` (N,): ``dim / 2`` sines then ``dim / 2`` cosines."""
    if dim % 2:
        raise ValueError(f"the 1D sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """(grid_size**2 [+1], dim) float32 embedding of a square grid of patches, row-major; with
    ``cls_token`` a row of zeros comes first (the class token's position)."""
    if dim % 4:
        raise ValueError(f"the 2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    embed = torch.cat(
        [sincos_pos_embed_1d(dim // 2, cols.flatten()), sincos_pos_embed_1d(dim // 2, rows.flatten())], dim=1
    )
    if cls_token:
        embed = torch.cat([torch.zeros(1, dim, dtype=embed.dtype), embed])
    return embed.float()
