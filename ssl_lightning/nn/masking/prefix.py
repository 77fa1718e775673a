"""Prefix-causal attention (AIM, El-Nouby et al. 2024, section 3, "Prefix Transformer"; the PrefixLM of Raffel
et al. 2020): the first ``S`` tokens of a sequence attend to each other bidirectionally, every later token
attends causally (to the prefix, to the tokens before it and to itself). ``S`` is drawn per image."""

from __future__ import annotations

import torch


def random_prefix_lengths(
    batch: int, num_patches: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(batch,) int64 prefix lengths ``S``, one per image, uniform in ``[1, num_patches - 1]`` (AIM's range,
    confirmed by its authors in apple/ml-aim issue 32): at least one prefix patch, at least one patch to predict."""
    if num_patches < 2:
        raise ValueError(f"a prefix needs at least 2 patches per image (one prefix, one to predict), got {num_patches}")
    return torch.randint(1, num_patches, (batch,), generator=generator, device=device)


def prefix_causal_mask(prefix_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, length, length) bool attention mask, True where a query may attend to a key: query ``i`` sees key
    ``j`` iff ``j < prefix_lengths[b]`` or ``j <= i``. The singleton head axis broadcasts over the heads of
    ``F.scaled_dot_product_attention`` (and of timm's unfused attention). Every row has a True entry (key 0)."""
    if prefix_lengths.ndim != 1:
        raise ValueError(f"prefix_lengths must have shape (B,), got {tuple(prefix_lengths.shape)}")
    positions = torch.arange(length, device=prefix_lengths.device)
    causal = positions[None, :] <= positions[:, None]  # (L, L): key j <= query i
    in_prefix = positions[None, None, :] < prefix_lengths[:, None, None]  # (B, 1, L): key j inside the prefix
    return (causal[None] | in_prefix)[:, None]
