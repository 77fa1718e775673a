"""Per-step random generators for masks: the same masks on a resumed run, different masks on each rank."""

from __future__ import annotations

import os
from typing import Optional

import torch


def default_mask_seed(seed: Optional[int]) -> int:
    """``seed``, or the global seed Lightning's ``seed_everything`` set (``PL_GLOBAL_SEED``), or 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


def step_generator(device: torch.device, seed: int, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, *key)``, e.g. ``key = (rank, global_step, micro_batch)``.

    Masks drawn from it depend on nothing but the key: not on the global RNG, not on what ran before, so an
    interrupted and resumed run draws the masks of the uninterrupted one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator
