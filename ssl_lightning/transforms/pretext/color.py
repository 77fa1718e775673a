"""CIE Lab colour for colorization (Zhang, Isola, Efros 2016, "Colorful Image Colorization"): sRGB <-> Lab
(D65 white, 2 degree observer; the formulas of scikit-image and ``kornia.color``) and the quantized ab
gamut (bins on a grid of side 10 that real colours reach, sec. 2.1).

Written here rather than imported from kornia: same formula (checked in the tests), no extra
dependency, no 2.5 s import.
"""

from __future__ import annotations

from functools import lru_cache

import torch

# sRGB primaries -> CIE XYZ, and the D65 reference white
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)
_DELTA = 6 / 29  # the CIE f(t) switches from a cube root to a line at t = delta**3


def _matrix(rows: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _apply(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``matrix @ colour`` for (..., 3, H, W) images."""
    return torch.einsum("ij,...jhw->...ihw", matrix, image)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (..., 3, H, W) -> Lab with L in [0, 100] and a, b within about [-110, 110]."""
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab expects (..., 3, H, W) images, got shape {tuple(rgb.shape)}")
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(0).pow(2.4), rgb / 12.92)
    xyz = _apply(_matrix(_RGB_TO_XYZ, rgb), linear) / _matrix(_D65_WHITE, rgb).view(3, 1, 1)
    f = torch.where(xyz > _DELTA**3, xyz.clamp_min(_DELTA**3).pow(1 / 3), xyz / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Lab (..., 3, H, W) -> sRGB, clipped to [0, 1] unless ``clip=False`` (out-of-gamut Lab colours)."""
    if lab.ndim < 3 or lab.shape[-3] != 3:
        raise ValueError(f"lab_to_rgb expects (..., 3, H, W) images, got shape {tuple(lab.shape)}")
    lightness, a, b = lab.unbind(-3)
    fy = (lightness + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)
    xyz = torch.where(f > _DELTA, f.pow(3), 3 * _DELTA**2 * (f - 4 / 29)) * _matrix(_D65_WHITE, lab).view(3, 1, 1)
    linear = _apply(torch.linalg.inv(_matrix(_RGB_TO_XYZ, lab)), xyz)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0.0031308).pow(1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1) if clip else rgb


@lru_cache(maxsize=4)
def _gamut_bins(grid_size: int, levels: int) -> torch.Tensor:
    steps = torch.linspace(0, 1, levels, dtype=torch.float64)
    rgb = torch.cartesian_prod(steps, steps, steps).t().reshape(1, 3, levels, levels * levels)
    cells = torch.round(rgb_to_lab(rgb)[0, 1:].reshape(2, -1) / grid_size).t()
    return torch.unique(cells, dim=0).float() * grid_size


def ab_gamut_bins(grid_size: int = 10, levels: int = 64) -> torch.Tensor:
    """(Q, 2) centres (multiples of ``grid_size``) of the ab grid cells that some sRGB colour falls in.

    Found by converting every colour of a ``levels``^3 RGB grid: Q = 261 for grid size 10, spanning
    a in [-90, 100] and b in [-110, 90] as the paper's bins do (Zhang et al. report Q = 313, a set taken
    more generously than the cells colours actually reach). Sorted by (a, b); cached per process.
    """
    if grid_size <= 0 or levels < 2:
        raise ValueError(f"grid_size must be positive and levels at least 2, got {grid_size} and {levels}")
    return _gamut_bins(grid_size, levels).clone()


def ab_bin_lookup(bins: torch.Tensor, grid_size: int = 10, extent: float = 130.0) -> torch.Tensor:
    """A (2K+1, 2K+1) table, K = ceil(extent / grid_size): cell (i, j), centred on ab = ((i-K) g, (j-K) g),
    maps to the index of the nearest bin in ``bins``; cells of the gamut map to themselves."""
    k = int(-(-extent // grid_size))
    centres = torch.arange(-k, k + 1, dtype=bins.dtype, device=bins.device) * grid_size
    grid = torch.cartesian_prod(centres, centres)
    return torch.cdist(grid, bins).argmin(dim=1).view(2 * k + 1, 2 * k + 1)


def ab_to_bins(ab: torch.Tensor, lookup: torch.Tensor, grid_size: int = 10) -> torch.Tensor:
    """Quantize ab (B, 2, H, W) to bin indices (B, H, W) through a table from ``ab_bin_lookup``: each pixel
    goes to its grid cell, and each cell to the nearest bin of the gamut."""
    k = (lookup.shape[0] - 1) // 2
    cell = torch.round(ab / grid_size).long().clamp_(-k, k) + k
    return lookup[cell[:, 0], cell[:, 1]]
