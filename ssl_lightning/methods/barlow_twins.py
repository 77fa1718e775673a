"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny 2021, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction"): two views through one network; the cross-correlation of their batch-normalized
projections over the global batch is pushed towards the identity."""

from __future__ import annotations

from typing import Any

import torch

from ssl_lightning.losses import barlow_twins_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class BarlowTwins(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim, projection_layers: the projector (8192-8192-8192 on
            ImageNet, sec. 4): linear layers with BatchNorm and ReLU between them, none after the last.
        off_diagonal_weight: lambda, the weight of the redundancy-reduction term (0.0051).

    The projector's outputs are normalized over the global batch inside the loss (the paper's non-affine
    BatchNorm). Its last layer's bias cancels in that normalization, so it gets no gradient.
    """

    def __init__(
        self,
        projection_hidden_dim: int = 8192,
        projection_dim: int = 8192,
        projection_layers: int = 3,
        off_diagonal_weight: float = 0.0051,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.off_diagonal_weight = off_diagonal_weight
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, projection_layers)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(view1)
        z1, z2 = self.projector(features), self.projector(self(view2))
        terms = barlow_twins_loss(z1, z2, self.off_diagonal_weight)
        self.log("train/loss", terms.loss, prog_bar=True)
        self.log("train/on_diag", terms.on_diag)
        self.log("train/off_diag", terms.off_diag)
        return {"loss": terms.loss, "features": features.detach(), "embeddings": z1.detach()}
