"""DenseCL (Wang et al. 2021, "Dense Contrastive Learning for Self-Supervised Visual Pre-Training"): MoCo v2 plus
a dense projection head on the backbone's feature map, whose every location is contrasted with the key view's
best-matching location (matched in backbone feature space) and a second queue of pooled dense keys."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.callbacks.queue import QueueUpdate
from ssl_lightning.distributed import shuffle_across_ranks, unshuffle_across_ranks
from ssl_lightning.losses import infonce_queue_loss
from ssl_lightning.losses.densecl import dense_contrastive_loss, dense_correspondence
from ssl_lightning.methods.moco_v2 import MoCoV2
from ssl_lightning.nn import DenseProjectionHead


class DenseCL(MoCoV2):
    """Args (besides ``MoCoV2``'s: projector, temperature, queue, momentum, shuffle-BN):
        dense_hidden_dim: the dense head's hidden width (2048; its output is ``projection_dim``).
        dense_weight: lambda, the dense loss's share: ``(1 - lambda) L_global + lambda L_dense`` (0.5).

    Needs a backbone with a spatial feature map (``feature_map``: the ResNets, ConvNeXts), checked when built. The
    dense queue (``dense_queue``, the same size as MoCo's) holds each key image's mean dense key, normalized.
    """

    def __init__(self, dense_hidden_dim: int = 2048, dense_weight: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.require_feature_map()
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"dense_weight must lie in [0, 1], got {dense_weight}")
        self.dense_weight = dense_weight
        self.dense_projector = DenseProjectionHead(self.backbone.feature_dim, dense_hidden_dim, self.queue.shape[1])
        self.key_dense_projector = self.frozen_copy(self.dense_projector)
        self.register_buffer("dense_queue", F.normalize(torch.randn_like(self.queue), dim=1))
        self.register_buffer("dense_queue_ptr", torch.zeros((), dtype=torch.long))

    def optimized_modules(self) -> list[torch.nn.Module]:
        return [*super().optimized_modules(), self.dense_projector]

    def configure_callbacks(self) -> list[Callback]:
        pairs = [("backbone", "key_backbone"), ("projector", "key_projector"), ("dense_projector", "key_dense_projector")]
        return [MomentumUpdate(pairs, base_momentum=self.momentum, schedule="constant"), QueueUpdate(),
                QueueUpdate("dense_queue", "dense_queue_ptr", "dense_keys")]

    @torch.no_grad()
    def encode_dense_keys(self, images: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The key encoder's normalized global keys (B, D), dense keys (B, D, Sk) and backbone features (B, C, Sk),
        with shuffle-BN across ranks as ``MoCoV2.encode_keys``."""
        unshuffle = None
        if self.shuffle_bn:
            generator = torch.Generator().manual_seed(hash((self.global_step, batch_idx)) & 0x7FFF_FFFF_FFFF_FFFF)
            images, unshuffle = shuffle_across_ranks(images, generator)
        feature_map = self.key_backbone.feature_map(self.to_memory_format(images))
        keys = F.normalize(self.key_projector(feature_map.mean(dim=(2, 3))), dim=1)
        dense_keys = self.key_dense_projector(feature_map)
        return tuple(unshuffle_across_ranks(t, unshuffle) for t in (keys, dense_keys, feature_map.flatten(2)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        feature_map = self.backbone.feature_map(self.to_memory_format(view1))
        features = feature_map.mean(dim=(2, 3))
        q, q_dense = self.projector(features), self.dense_projector(feature_map)
        k, k_dense, key_features = self.encode_dense_keys(view2, batch_idx)
        matches = dense_correspondence(feature_map.flatten(2).detach(), key_features)
        global_loss = infonce_queue_loss(q, k, self.queue, self.temperature, self.loss_name, self.dclw_sigma)
        dense_loss = dense_contrastive_loss(q_dense, k_dense, matches, self.dense_queue, self.temperature)
        loss = (1 - self.dense_weight) * global_loss + self.dense_weight * dense_loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/global_loss", global_loss)
        self.log("train/dense_loss", dense_loss)
        return {"loss": loss, "features": features.detach(), "embeddings": q.detach(), "keys": k,
                "dense_keys": F.normalize(k_dense.float().mean(dim=2), dim=1)}
