"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"):
an online network with a predictor regresses the projection of a slowly moving target network."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ssl_lightning.callbacks.momentum import MomentumSchedule, MomentumUpdate
from ssl_lightning.losses import normalized_mse
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class BYOL(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: the projector (4096 -> 256).
        prediction_hidden_dim: the predictor's hidden size (4096), online side only.
        base_momentum, final_momentum, momentum_schedule: the target's EMA ``tau``, cosine from 0.996 to 1
            over the optimizer steps on ImageNet (0.99 suits small datasets).

    The target encoder and target projector start as copies of the online ones (sec. 3.1) and receive no
    gradient. ``MomentumUpdate`` comes with the method (``configure_callbacks``).
    """

    def __init__(
        self,
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        prediction_hidden_dim: int = 4096,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        momentum_schedule: MomentumSchedule = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.base_momentum, self.final_momentum, self.momentum_schedule = base_momentum, final_momentum, momentum_schedule
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, num_layers=2)
        self.predictor = MLPHead(projection_dim, prediction_hidden_dim, projection_dim, num_layers=2)
        self.target_backbone = self.frozen_copy(self.backbone)
        self.target_projector = self.frozen_copy(self.projector)

    def optimized_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector, self.predictor]

    def configure_callbacks(self) -> list[Callback]:
        pairs = [("backbone", "target_backbone"), ("projector", "target_projector")]
        return [MomentumUpdate(pairs, self.base_momentum, self.final_momentum, self.momentum_schedule)]

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The target projection ``z'`` (no gradient)."""
        return self.target_projector(self.target_backbone(self.to_memory_format(images)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(view1)
        z1 = self.projector(features)
        p1, p2 = self.predictor(z1), self.predictor(self.projector(self(view2)))
        loss = normalized_mse(p1, self.target(view2)) + normalized_mse(p2, self.target(view1))  # L + L~, eq. 2
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features.detach(), "embeddings": z1.detach()}
