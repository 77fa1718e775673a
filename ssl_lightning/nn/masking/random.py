"""Uniformly random patch masks with the same number of masked patches in every image (MAE, SimMIM, MSN's
random masking), and the index lists that let an encoder skip masked patches."""

from __future__ import annotations

from typing import Optional

import torch


def random_mask(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(batch, num_patches) bool, True on ``round(mask_ratio * num_patches)`` patches per image chosen uniformly
    at random (argsort of per-image uniform noise: no Python loop over images)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    num_masked = masked_count(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


def masked_count(num_patches: int, mask_ratio: float) -> int:
    """How many of ``num_patches`` patches ``random_mask`` masks in each image."""
    return int(round(mask_ratio * num_patches))


def kept_indices(mask: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """The indices (B, n) of the unmasked patches of each image, in patch order; every row of ``mask`` (B, N)
    must keep the same number ``n``. ``count``: that ``n`` when the caller knows it (e.g. ``N - masked_count``
    for ``random_mask``): no check and no host read, which on a GPU would wait for the device."""
    return _indices_of(~mask, "unmasked", count)


def masked_indices(mask: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """The indices (B, n) of the masked patches of each image, in patch order (same count in every row);
    ``count`` as in ``kept_indices``."""
    return _indices_of(mask, "masked", count)


def _indices_of(selected: torch.Tensor, what: str, count: Optional[int]) -> torch.Tensor:
    if count is None:
        counts = selected.sum(dim=1)
        if selected.ndim != 2 or bool((counts != counts[0]).any()):
            raise ValueError(f"every image must have the same number of {what} patches, got {counts.tolist()}")
        count = int(counts[0])
    # a stable sort puts the selected patches first, in patch order
    order = torch.sort((~selected).to(torch.uint8), dim=1, stable=True).indices
    return order[:, :count]
