"""Pretext-task operations on batches of views: rotations, jigsaw tiles, Lab colour, inpainting masks.

Pure functions, batched on the device; random draws come from an explicit generator.
"""

from ssl_lightning.transforms.pretext.color import ab_bin_lookup, ab_gamut_bins, ab_to_bins, lab_to_rgb, rgb_to_lab
from ssl_lightning.transforms.pretext.jigsaw import (
    extract_tiles,
    maximal_hamming_permutations,
    min_hamming_distance,
    normalize_tiles,
    shuffle_tiles,
)
from ssl_lightning.transforms.pretext.masks import center_mask, random_boxes_mask
from ssl_lightning.transforms.pretext.rotation import NUM_ROTATIONS, rotate_batch

__all__ = [
    "NUM_ROTATIONS",
    "ab_bin_lookup",
    "ab_gamut_bins",
    "ab_to_bins",
    "center_mask",
    "extract_tiles",
    "lab_to_rgb",
    "maximal_hamming_permutations",
    "min_hamming_distance",
    "normalize_tiles",
    "random_boxes_mask",
    "rgb_to_lab",
    "rotate_batch",
    "shuffle_tiles",
]
