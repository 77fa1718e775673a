"""Masks of masked image modelling and joint-embedding predictive methods, drawn per image, batched, from an
explicit generator (each step's generator seeded from (seed, rank, step), so ranks differ and a resumed run
draws the same masks)."""

from ssl_lightning.nn.masking.generator import default_mask_seed, step_generator
from ssl_lightning.nn.masking.random import kept_indices, masked_count, masked_indices, random_mask
from ssl_lightning.nn.masking.blockwise import PatchMasks, block_masks, blockwise_mask, mask_ratios
from ssl_lightning.nn.masking.stratified import stratified_mask_ratios
from ssl_lightning.nn.masking.multiblock import MultiBlockMasks, multiblock_masks
from ssl_lightning.nn.masking.coarse import coarse_random_mask, upsample_mask
from ssl_lightning.nn.masking.prefix import prefix_causal_mask, random_prefix_lengths

__all__ = [
    "default_mask_seed",
    "step_generator",
    "random_mask",
    "kept_indices",
    "masked_count",
    "masked_indices",
    "PatchMasks",
    "block_masks",
    "blockwise_mask",
    "mask_ratios",
    "stratified_mask_ratios",
    "MultiBlockMasks",
    "multiblock_masks",
    "coarse_random_mask",
    "upsample_mask",
    "prefix_causal_mask",
    "random_prefix_lengths",
]
