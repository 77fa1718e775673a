"""Masks of masked image modelling and joint-embedding predictive methods, drawn per image, batched, from an
explicit generator (each step's generator seeded from (seed, rank, step), so ranks differ and a resumed run
draws the same masks)."""

from ssl_lightning.nn.masking.generator import default_mask_seed, step_generator
from ssl_lightning.nn.masking.random import kept_indices, masked_indices, random_mask

__all__ = ["default_mask_seed", "step_generator", "random_mask", "kept_indices", "masked_indices"]
