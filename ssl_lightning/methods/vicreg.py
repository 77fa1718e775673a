"""VICReg (Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning"): two views through one network; their embeddings are made invariant while the
variance and covariance terms over the global batch keep them from collapsing."""

from __future__ import annotations

from typing import Any

import torch

from ssl_lightning.losses import vicreg_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class VICReg(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim, projection_layers: the expander (8192-8192-8192 on
            ImageNet, sec. 4.1): linear layers with BatchNorm and ReLU between them, none after the last.
        invariance_weight, variance_weight, covariance_weight: lambda, mu, nu (25, 25, 1).

    The expander's last bias cancels in all three terms (differences and centred statistics), so it gets no
    gradient.
    """

    def __init__(
        self,
        projection_hidden_dim: int = 8192,
        projection_dim: int = 8192,
        projection_layers: int = 3,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.weights = {"invariance_weight": invariance_weight, "variance_weight": variance_weight,
                        "covariance_weight": covariance_weight}
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, projection_layers)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(view1)
        z1, z2 = self.projector(features), self.projector(self(view2))
        terms = vicreg_loss(z1, z2, **self.weights)
        self.log("train/loss", terms.loss, prog_bar=True)
        self.log("train/invariance", terms.invariance)
        self.log("train/variance", terms.variance)
        self.log("train/covariance", terms.covariance)
        return {"loss": terms.loss, "features": features.detach(), "embeddings": z1.detach()}
