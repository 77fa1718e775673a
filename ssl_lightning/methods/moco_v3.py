"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers"):
a query encoder with a predictor, a momentum key encoder, and a symmetric InfoNCE whose negatives are
the keys of the global batch (no queue). Works with ResNet and ViT backbones."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ssl_lightning.callbacks.momentum import MomentumSchedule, MomentumUpdate
from ssl_lightning.losses import moco_v3_loss
from ssl_lightning.losses.dcl import ContrastiveLoss, check_contrastive_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class MoCoV3(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim, projection_layers: the projector, BatchNorm after every
            layer including the last (4096 -> 256; 2 layers on ResNets, 3 on ViTs in the paper).
        prediction_hidden_dim: the predictor's hidden size (2 layers, 4096).
        temperature: InfoNCE temperature (0.2 for ViTs; the paper's ResNet-50 recipe uses 1.0).
        loss, dclw_sigma: ``nt_xent`` (the paper's InfoNCE), ``dcl`` or ``dclw`` (Yeh et al. 2022: the positive
            left out of the denominator; DCLW also weights it, kernel width ``dclw_sigma``).
        base_momentum, final_momentum, momentum_schedule: the momentum encoder's EMA (0.99 with a cosine
            schedule to 1 in the paper's recipes).
        freeze_patch_embed: keep a ViT's random patch projection fixed (sec. 4.2, "stop-grad-conv1"),
            which stabilizes ViT training.

    ``MomentumUpdate`` comes with the method (``configure_callbacks``).
    """

    def __init__(
        self,
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        projection_layers: int = 2,
        prediction_hidden_dim: int = 4096,
        temperature: float = 0.2,
        loss: ContrastiveLoss = "nt_xent",
        dclw_sigma: float = 0.5,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        momentum_schedule: MomentumSchedule = "cosine",
        freeze_patch_embed: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_contrastive_loss(loss, dclw_sigma)
        self.temperature, self.loss_name, self.dclw_sigma = temperature, loss, dclw_sigma
        self.base_momentum, self.final_momentum, self.momentum_schedule = base_momentum, final_momentum, momentum_schedule
        if freeze_patch_embed:
            self._patch_embedding().requires_grad_(False)
        self.projector = MLPHead(
            self.backbone.feature_dim, projection_hidden_dim, projection_dim, projection_layers, last_bn=True
        )
        self.predictor = MLPHead(projection_dim, prediction_hidden_dim, projection_dim, num_layers=2)
        self.momentum_backbone = self.frozen_copy(self.backbone)
        self.momentum_projector = self.frozen_copy(self.projector)

    def _patch_embedding(self) -> nn.Module:
        for name, module in self.backbone.named_modules():
            if name.rsplit(".", 1)[-1] == "patch_embed":
                return module
        raise ValueError("freeze_patch_embed needs a ViT backbone (a module named 'patch_embed')")

    def optimized_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector, self.predictor]

    def configure_callbacks(self) -> list[Callback]:
        pairs = [("backbone", "momentum_backbone"), ("projector", "momentum_projector")]
        return [MomentumUpdate(pairs, self.base_momentum, self.final_momentum, self.momentum_schedule)]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(view1)
        z1 = self.projector(features)
        q1, q2 = self.predictor(z1), self.predictor(self.projector(self(view2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(self.to_memory_format(view1)))
            k2 = self.momentum_projector(self.momentum_backbone(self.to_memory_format(view2)))
        loss = moco_v3_loss(q1, q2, k1, k2, self.temperature, self.loss_name, self.dclw_sigma)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features.detach(), "embeddings": z1.detach()}
