"""SimSiam (Chen and He 2021, "Exploring Simple Siamese Representation Learning"): one encoder for both
views, a predictor on one side, and stop-gradient on the other, which is what prevents collapse."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_lightning.losses import negative_cosine_similarity
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class SimSiam(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim, projection_layers: the projector, BatchNorm on every layer
            including the output (3 layers of 2048 on ImageNet).
        prediction_hidden_dim: the predictor's bottleneck (512; 2 layers, no BatchNorm on the output).
        stop_gradient: detach the target branch (the paper's fig. 2 shows collapse without it).
        fixed_predictor_lr: train the predictor at the constant base learning rate (no warm-up, no decay),
            which the paper found slightly better (sec. 4.2, "--fix-pred-lr" in its code).
    """

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        projection_layers: int = 3,
        prediction_hidden_dim: int = 512,
        stop_gradient: bool = True,
        fixed_predictor_lr: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stop_gradient, self.fixed_predictor_lr = stop_gradient, fixed_predictor_lr
        self.projector = MLPHead(
            self.backbone.feature_dim, projection_hidden_dim, projection_dim, projection_layers, last_bn=True
        )
        self.predictor = MLPHead(projection_dim, prediction_hidden_dim, projection_dim, num_layers=2)

    def optimized_modules(self) -> list[nn.Module]:
        trained = [self.backbone, self.projector]
        return trained if self.fixed_predictor_lr else [*trained, self.predictor]

    def fixed_lr_modules(self) -> list[nn.Module]:
        return [self.predictor] if self.fixed_predictor_lr else []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(view1)
        z1, z2 = self.projector(features), self.projector(self(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        loss = negative_cosine_similarity(p1, z2) / 2 + negative_cosine_similarity(p2, z1) / 2  # Algorithm 1
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features.detach(), "embeddings": z1.detach()}
