"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of
Visual Representations"): SimCLR's two views, a projector and a predictor, and as each view's positive the
nearest neighbour of its projection in a support set (a queue of past projections of the global batch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from ssl_lightning.callbacks.queue import QueueUpdate
from ssl_lightning.losses.nnclr import nearest_neighbours, nnclr_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class NNCLR(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim, projection_layers: the projector (3 layers, 2048 -> 256, BatchNorm).
        prediction_hidden_dim: the predictor (2 layers, 4096).
        temperature: 0.1.
        queue_size: the support set (98,304 on ImageNet). ``QueueUpdate`` fills it after every optimizer step
            with the normalized projections of view 1 of every rank, in rank order, so every rank holds the same
            support set and the neighbours of one process; it is a buffer, saved in checkpoints. The global batch
            (per-device batch x processes x accumulation) must divide it, checked when the run starts.
    """

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 256,
        projection_layers: int = 3,
        prediction_hidden_dim: int = 4096,
        temperature: float = 0.1,
        queue_size: int = 98304,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        self.temperature = temperature
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, projection_layers,
                                 last_bn=True)
        self.predictor = MLPHead(projection_dim, prediction_hidden_dim, projection_dim, num_layers=2)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def configure_callbacks(self) -> list[Callback]:
        return [QueueUpdate()]

    def setup(self, stage: str) -> None:
        trainer, datamodule = self.trainer, getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        if stage != "fit" or batch_size is None:
            return
        step_batch = batch_size * trainer.world_size * trainer.accumulate_grad_batches
        if self.queue.shape[0] % step_batch:
            raise ValueError(f"NNCLR: queue_size={self.queue.shape[0]} is not a multiple of the global batch per "
                             f"optimizer step ({batch_size} x {trainer.world_size} processes x "
                             f"{trainer.accumulate_grad_batches} accumulated = {step_batch}); use e.g. "
                             f"queue_size={max(1, self.queue.shape[0] // step_batch) * step_batch}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(torch.cat([view1, view2]))
        z1, z2 = self.projector(features).chunk(2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # the neighbours are copies of support-set rows (no gradient): QueueUpdate may overwrite the buffer later
        loss = (nnclr_loss(nearest_neighbours(z1, self.queue), p2, self.temperature)
                + nnclr_loss(nearest_neighbours(z2, self.queue), p1, self.temperature)) / 2
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features[: view1.shape[0]].detach(), "embeddings": z1.detach(),
                "keys": F.normalize(z1.detach().float(), dim=1)}
