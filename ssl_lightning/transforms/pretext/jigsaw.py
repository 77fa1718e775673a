"""Jigsaw puzzles (Noroozi and Favaro 2016, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles"): tiles of a grid, a fixed set of maximally distant permutations, per-tile normalization."""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch

MAX_TILES = 9  # the greedy search enumerates all n! permutations: 9! = 362,880 is the practical limit


def maximal_hamming_permutations(num_permutations: int = 100, num_tiles: int = 9, seed: int = 0) -> torch.Tensor:
    """A fixed set of permutations chosen greedily for a maximal minimum Hamming distance (Algorithm 1).

    Starting from one permutation drawn with ``seed``, each step adds the permutation whose smallest Hamming
    distance to the set chosen so far is largest (ties: the first in lexicographic order). The paper's
    Algorithm 1 writes the average distance as the criterion; with it the minimum distance of 100
    permutations of 9 tiles drops to 2, with the max-min criterion used here it is 6. Deterministic and
    cached per process. Returns a (num_permutations, num_tiles) int64 tensor; row ``p`` maps shuffled
    position ``i`` to original tile ``p[i]``.
    """
    if not 2 <= num_tiles <= MAX_TILES:
        raise ValueError(f"num_tiles must lie in [2, {MAX_TILES}] (all n! permutations are searched), got {num_tiles}")
    if not 1 <= num_permutations <= math.factorial(num_tiles):
        raise ValueError(
            f"num_permutations must lie in [1, {math.factorial(num_tiles)}] for {num_tiles} tiles, "
            f"got {num_permutations}"
        )
    return _greedy_max_min(num_permutations, num_tiles, seed).clone()


@lru_cache(maxsize=8)
def _greedy_max_min(num_permutations: int, num_tiles: int, seed: int) -> torch.Tensor:
    # NumPy on one thread: ~0.2 s for 100 of 9! candidates, where small torch ops slow down on a busy machine
    flat = itertools.chain.from_iterable(itertools.permutations(range(num_tiles)))
    candidates = np.fromiter(flat, dtype=np.uint8, count=math.factorial(num_tiles) * num_tiles).reshape(-1, num_tiles)
    columns = np.ascontiguousarray(candidates.T)  # one row per position: fast comparisons against a scalar

    def distances(index: int) -> np.ndarray:
        d = np.zeros(columns.shape[1], dtype=np.uint8)
        for position, tile in enumerate(candidates[index]):
            d += columns[position] != tile
        return d

    first = int(np.random.default_rng(seed).integers(len(candidates)))
    chosen, min_distance = [first], distances(first)
    for _ in range(num_permutations - 1):
        farthest = int(min_distance.argmax())  # the first of the largest; chosen ones are at distance 0
        chosen.append(farthest)
        np.minimum(min_distance, distances(farthest), out=min_distance)
    return torch.from_numpy(candidates[chosen].astype(np.int64))


def min_hamming_distance(permutations: torch.Tensor) -> int:
    """The smallest Hamming distance between two distinct rows of a (P, T) permutation set (P >= 2)."""
    if permutations.ndim != 2 or permutations.shape[0] < 2:
        raise ValueError(f"expected at least two permutations shaped (P, T), got shape {tuple(permutations.shape)}")
    distances = (permutations[:, None, :] != permutations[None, :, :]).sum(-1)
    distances.fill_diagonal_(permutations.shape[1] + 1)
    return int(distances.min())


def extract_tiles(images: torch.Tensor, grid_size: int, tile_size: int, generator: torch.Generator) -> torch.Tensor:
    """Cut each image into a ``grid_size`` x ``grid_size`` grid of cells and take one ``tile_size`` square at a
    random offset inside each cell (the gap between tiles hides edge continuity).

    (B, C, H, W) -> (B, grid_size**2, C, tile_size, tile_size), tiles in row-major grid order. The grid's
    origin (when the cells do not fill the image) and every tile's offset are drawn per sample from
    ``generator``, which must live on the images' device.
    """
    b, c, height, width = images.shape
    cell_h, cell_w = height // grid_size, width // grid_size
    if not 1 <= tile_size <= min(cell_h, cell_w):
        raise ValueError(
            f"tile_size must lie in [1, {min(cell_h, cell_w)}] for {grid_size}x{grid_size} cells of a "
            f"{height}x{width} image, got {tile_size}"
        )
    num_tiles, device = grid_size * grid_size, images.device
    cell = torch.arange(num_tiles, device=device)
    spare = torch.tensor([height - grid_size * cell_h, width - grid_size * cell_w], device=device)
    gap = torch.tensor([cell_h - tile_size, cell_w - tile_size], device=device)
    u = torch.rand(b, 1 + num_tiles, 2, generator=generator, device=device)
    origin = (u[:, :1] * (spare + 1)).long()  # (B, 1, 2)
    offset = (u[:, 1:] * (gap + 1)).long()  # (B, T, 2)
    corner = origin + offset + torch.stack([cell // grid_size * cell_h, cell % grid_size * cell_w], dim=1)
    steps = torch.arange(tile_size, device=device)
    rows = (corner[..., 0, None] + steps)[..., :, None]  # (B, T, tile, 1)
    cols = (corner[..., 1, None] + steps)[..., None, :]  # (B, T, 1, tile)
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    return images[batch, :, rows, cols].permute(0, 1, 4, 2, 3)  # advanced indices first: (B, T, tile, tile, C)


def normalize_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean and unit standard deviation per tile, over its channels and pixels, so that low-level
    statistics shared by neighbouring tiles do not give the answer away."""
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / (std + eps)


def shuffle_tiles(tiles: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """Place tile ``permutations[b, i]`` of sample ``b`` at position ``i``: (B, T, ...) with (B, T) -> (B, T, ...).

    Inverse: ``shuffle_tiles(shuffled, permutations.argsort(dim=1))``.
    """
    if permutations.shape != tiles.shape[:2]:
        raise ValueError(
            f"permutations shaped {tuple(permutations.shape)} do not match tiles shaped {tuple(tiles.shape)}"
        )
    index = permutations.view(*permutations.shape, *([1] * (tiles.ndim - 2))).expand_as(tiles)
    return tiles.gather(1, index)
