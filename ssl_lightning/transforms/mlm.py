"""BERT's masking of token sequences (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding", section 3.1 and appendix A.1)."""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100  # label of the positions without a prediction (``F.cross_entropy``'s default)


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    replacement_ids: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    mask_prob: float = 0.15,
    mask_share: float = 0.8,
    random_share: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``round(mask_prob * n)`` of the ``n`` maskable tokens of each sequence (at least one), then
    replace each chosen token by ``[MASK]`` with probability ``mask_share``, by a random token from
    ``replacement_ids`` with probability ``random_share``, and keep it otherwise.

    Args:
        input_ids: (B, L) token ids.
        maskable: (B, L) bool, False on special and padding tokens (never chosen).
        mask_token_id: the id of ``[MASK]``.
        replacement_ids: (V,) the ids a random replacement is drawn from, uniformly.
        generator: the source of every random draw.

    Returns ``(masked_ids, labels)``: the corrupted input and the original ids at the chosen positions,
    ``IGNORE_INDEX`` elsewhere.
    """
    if input_ids.shape != maskable.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and maskable {tuple(maskable.shape)} must be the same (B, L)")
    if not 0.0 < mask_prob <= 1.0 or mask_share < 0 or random_share < 0 or mask_share + random_share > 1:
        raise ValueError(f"bad masking probabilities: mask_prob={mask_prob}, mask_share={mask_share}, random_share={random_share}")
    device = input_ids.device
    # rank the maskable positions of each row in a random order; the others rank after them
    noise = torch.rand(input_ids.shape, device=device, generator=generator).masked_fill(~maskable, 2.0)
    rank = noise.argsort(dim=1).argsort(dim=1)
    available = maskable.sum(dim=1, keepdim=True)
    count = torch.minimum((available * mask_prob).round().clamp(min=1), available)
    chosen = rank < count
    action = torch.rand(input_ids.shape, device=device, generator=generator)
    to_mask = chosen & (action < mask_share)
    to_random = chosen & (action >= mask_share) & (action < mask_share + random_share)
    random_ids = replacement_ids.to(device)[
        torch.randint(len(replacement_ids), input_ids.shape, device=device, generator=generator)
    ]
    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked_ids = torch.where(to_random, random_ids, masked_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked_ids, labels
