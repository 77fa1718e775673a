"""Jigsaw puzzles (Noroozi and Favaro 2016, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles"): shuffle a 3x3 grid of tiles by one of a fixed set of maximally distant permutations;
a shared tile encoder and a classifier on the concatenated tile features name the permutation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from ssl_lightning.methods.pretext import PretextMethod, top1_accuracy
from ssl_lightning.nn import MLPHead
from ssl_lightning.nn.batchnorm import running_stats_frozen
from ssl_lightning.transforms.pretext import (
    extract_tiles,
    maximal_hamming_permutations,
    min_hamming_distance,
    normalize_tiles,
    shuffle_tiles,
)


class Jigsaw(PretextMethod):
    """Args (besides ``SSLMethod``'s):
        num_permutations: size of the permutation set (100 in the paper's main results).
        grid_size: tiles per side (3).
        tile_fraction: tile side / cell side (the paper: 64-pixel tiles in 75-pixel cells); the rest is a
            random gap so that tile edges do not give the answer.
        normalize_tiles: per-tile mean and standard deviation normalization (against low-level shortcuts).
        head_hidden_dim: hidden width of the classifier on the concatenated tile features (fc7: 4096).
        permutation_seed: seed of the greedy permutation search (the set is a buffer, saved in checkpoints).

    The backbone (the shared tile encoder, the paper's "context-free network") runs on every tile; its
    features are concatenated in shuffled-position order for the classifier. Evaluation sees whole
    images, so BatchNorm running statistics are left untouched by the tile pass and updated by a
    no-gradient pass on the whole views, whose features also feed the probe. Logs ``train/jigsaw_acc``;
    prints the set's minimum pairwise Hamming distance at the start of fitting.
    """

    def __init__(
        self,
        num_permutations: int = 100,
        grid_size: int = 3,
        tile_fraction: float = 64 / 75,
        normalize_tiles: bool = True,
        head_hidden_dim: int = 4096,
        permutation_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < tile_fraction <= 1.0:
            raise ValueError(f"tile_fraction must lie in (0, 1], got {tile_fraction!r}")
        self.grid_size, self.tile_fraction, self.normalize_tiles = grid_size, tile_fraction, normalize_tiles
        self.register_buffer(
            "permutations", maximal_hamming_permutations(num_permutations, grid_size * grid_size, permutation_seed)
        )
        in_dim = grid_size * grid_size * self.backbone.feature_dim
        self.head = MLPHead(in_dim, head_hidden_dim, num_permutations, num_layers=2)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        rank_zero_info(
            f"Jigsaw: {self.permutations.shape[0]} permutations of {self.permutations.shape[1]} tiles, "
            f"minimum pairwise Hamming distance {min_hamming_distance(self.permutations)}"
        )

    def tile_size(self, image_size: int) -> int:
        return max(1, int(image_size // self.grid_size * self.tile_fraction))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view = self.single_view(batch)
        b = view.shape[0]
        generator = self.task_generator(view.device)
        tiles = extract_tiles(view, self.grid_size, self.tile_size(min(view.shape[-2:])), generator)
        if self.normalize_tiles:
            tiles = normalize_tiles(tiles)
        labels = torch.randint(self.permutations.shape[0], (b,), generator=generator, device=view.device)
        puzzles = shuffle_tiles(tiles, self.permutations[labels])
        with running_stats_frozen(self.backbone):
            tile_features = self(puzzles.flatten(0, 1))
        logits = self.head(tile_features.view(b, -1))
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            features = self(view)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/jigsaw_acc", top1_accuracy(logits.detach(), labels), prog_bar=True)
        return {"loss": loss, "features": features}
