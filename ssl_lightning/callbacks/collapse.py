"""Collapse monitor: how spread out a method's embeddings are (Chen and He 2021, "Exploring Simple Siamese
Representation Learning", sec. 4.1 and fig. 2; effective rank of Roy and Vetterli 2007, as in RankMe,
Garrido et al. 2023)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


@torch.no_grad()
def embedding_std(embeddings: torch.Tensor) -> torch.Tensor:
    """Standard deviation over the batch of the L2-normalized embeddings, per dimension, averaged.

    About ``1 / sqrt(D)`` for embeddings spread over the sphere, 0 when they all collapse to one vector.
    """
    return F.normalize(embeddings.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(embeddings: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``exp`` of the entropy of the normalized singular values of the L2-normalized embeddings (N, D).

    Between 1 (every embedding on one direction) and ``min(N, D)`` (all singular values equal).
    """
    singular_values = torch.linalg.svdvals(F.normalize(embeddings.float(), dim=1))
    p = singular_values / singular_values.sum().clamp_min(eps) + eps
    return torch.exp(-(p * p.log()).sum())


class CollapseMonitor(Callback):
    """Log ``collapse/std`` and ``collapse/effective_rank`` of ``outputs[output_key]`` of ``training_step``
    every ``every_n_batches`` training batches (on each rank's own batch, no cross-rank sync), and warn
    when they fall towards collapse.

    Two kinds of collapse are caught: every embedding on one point (the std drops below
    ``min_std_ratio / sqrt(D)``, a fraction of the value of embeddings spread over the sphere), and the
    embeddings squeezed onto a few directions (the effective rank drops below ``min_rank_ratio`` of
    ``min(N, D)``), which a projector ending in BatchNorm shows instead, since BatchNorm keeps each
    dimension spread over the batch. The warning is given once per run; ``collapsed`` tells whether it was.
    """

    def __init__(
        self,
        output_key: str = "embeddings",
        every_n_batches: int = 50,
        min_std_ratio: float = 0.2,
        min_rank_ratio: float = 0.1,
    ) -> None:
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be positive, got {every_n_batches}")
        self.output_key, self.every_n_batches = output_key, every_n_batches
        self.min_std_ratio, self.min_rank_ratio = min_std_ratio, min_rank_ratio
        self.collapsed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.collapsed = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % self.every_n_batches != 0:
            return
        if not isinstance(outputs, dict) or self.output_key not in outputs:
            raise KeyError(
                f"CollapseMonitor: training_step returned no {self.output_key!r}; set output_key to one of its outputs"
            )
        embeddings = outputs[self.output_key]
        std, rank = embedding_std(embeddings), effective_rank(embeddings)
        pl_module.log_dict({"collapse/std": std, "collapse/effective_rank": rank}, on_step=True, on_epoch=False)
        dim, max_rank = embeddings.shape[1], min(embeddings.shape)
        std_ratio, rank_value = std.item() * math.sqrt(dim), rank.item()  # host sync only every n batches
        if not self.collapsed and (std_ratio < self.min_std_ratio or rank_value < self.min_rank_ratio * max_rank):
            self.collapsed = True
            rank_zero_warn(
                f"CollapseMonitor: the embeddings are collapsing at step {trainer.global_step}: the std of the "
                f"L2-normalized embeddings is {std.item():.2e} ({std_ratio:.2f} x the 1/sqrt({dim}) of spread-out "
                f"embeddings) and their effective rank is {rank_value:.2f} of at most {max_rank}. "
                "Check the stop-gradient, the predictor, the learning rate and the momentum."
            )
