"""TiCo (Zhu et al. 2022, "TiCo: Transformation Invariance and Covariance Contrast for Self-Supervised Visual
Representation Learning"): two views, a projector, invariance between the views and contrast against a running
covariance of the embeddings (kept as a float32 buffer, updated with the global batch every step)."""

from __future__ import annotations

from typing import Any

import torch

from ssl_lightning.losses.tico import tico_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class TiCo(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim, projection_layers: the projector (4096 -> 256, 2 layers).
        beta: the running covariance's momentum (0.9); rho: the weight of the covariance contrast (20).

    The covariance ``C`` (projection_dim^2, float32) is a buffer, so it is checkpointed and resumes exactly; it
    moves once per training step (every micro-batch under gradient accumulation, as each is a batch of the paper).
    """

    def __init__(
        self,
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        projection_layers: int = 2,
        beta: float = 0.9,
        rho: float = 20.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        self.beta, self.rho = beta, rho
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, projection_layers)
        self.register_buffer("covariance", torch.zeros(projection_dim, projection_dim, dtype=torch.float32))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(torch.cat([view1, view2]))
        z1, z2 = self.projector(features).chunk(2)
        terms = tico_loss(z1, z2, self.covariance, self.beta, self.rho)
        self.covariance.copy_(terms.covariance)
        self.log("train/loss", terms.loss, prog_bar=True)
        self.log("train/invariance", terms.invariance)
        self.log("train/contrast", terms.contrast)
        return {"loss": terms.loss, "features": features[: view1.shape[0]].detach(), "embeddings": z1.detach()}
