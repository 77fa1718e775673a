"""W-MSE (Ermolov et al. 2021, "Whitening for Self-Supervised Representation Learning"): K views through one
network and projector; each view's embeddings whitened on sub-batches of the global batch, then pulled together
by the normalized MSE (``losses.wmse``)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ssl_lightning.losses.wmse import wmse_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead
from ssl_lightning.nn.masking import default_mask_seed, step_generator


class WMSE(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: the projector (1024 -> 64 on CIFAR, 1024 -> 128 on ImageNet).
        num_views: K views per image (2: W-MSE 2, 4: W-MSE 4); every pair of views is compared.
        whitening_size: images per whitening sub-batch (128 on CIFAR, 256 on ImageNet); larger than
            ``projection_dim`` (a singular covariance otherwise) and a divisor of the global batch.
        whitening_iterations: random sub-batch splits per step, averaged (1).
        whitening_eps: shrinkage of the covariance towards the identity (0).
        permutation_seed: seed of the sub-batch splits (default: the global seed); each step's split is drawn from
            (seed, step, micro-batch), the same on every rank and on a resumed run.
    """

    def __init__(
        self,
        projection_hidden_dim: int = 1024,
        projection_dim: int = 64,
        num_views: int = 2,
        whitening_size: int = 128,
        whitening_iterations: int = 1,
        whitening_eps: float = 0.0,
        permutation_seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if whitening_size <= projection_dim:
            raise ValueError(f"whitening_size={whitening_size} must be larger than projection_dim={projection_dim}: "
                             f"a sub-batch's covariance is singular otherwise")
        if num_views < 2 or whitening_iterations < 1:
            raise ValueError(f"num_views must be >= 2 and whitening_iterations >= 1, got {num_views} and {whitening_iterations}")
        self.num_views, self.whitening_size = num_views, whitening_size
        self.whitening_iterations, self.whitening_eps = whitening_iterations, whitening_eps
        self.permutation_seed = default_mask_seed(permutation_seed)
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, num_layers=2)

    def setup(self, stage: str) -> None:
        self.require_views(self.num_views)
        trainer = self.trainer
        batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if batch_size is not None and (batch_size * trainer.world_size) % self.whitening_size:
            raise ValueError(f"WMSE: the global batch ({batch_size} x {trainer.world_size} processes) is not a "
                             f"multiple of whitening_size={self.whitening_size}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        if len(views) != self.num_views:
            raise ValueError(f"WMSE expects {self.num_views} views per image, got {len(views)}")
        features = self(torch.cat(views))
        embeddings = list(self.projector(features).chunk(self.num_views))
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        generator = step_generator(torch.device("cpu"), self.permutation_seed, self.trainer.global_step, micro_batch)
        loss = wmse_loss(embeddings, self.whitening_size, generator, self.whitening_iterations, self.whitening_eps)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features[: views[0].shape[0]].detach(), "embeddings": embeddings[0].detach()}
