"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of
Visual Representations"): two views, a projection head, NT-Xent over the global batch; with ``loss: dcl`` /
``dclw`` it is DCL / DCLW (Yeh et al. 2022, "Decoupled Contrastive Learning")."""

from __future__ import annotations

from typing import Any

import torch

from ssl_lightning.losses import nt_xent_loss
from ssl_lightning.losses.dcl import ContrastiveLoss, check_contrastive_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class SimCLR(SSLMethod):
    """Args (besides ``SSLMethod``'s): projector sizes and the temperature; ``loss``: ``nt_xent`` (SimCLR),
    ``dcl`` (the positive pair left out of the denominator) or ``dclw`` (also the positive term weighted by a
    von Mises-Fisher kernel of width ``dclw_sigma``, 0.5 in the paper)."""

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.5,
        loss: ContrastiveLoss = "nt_xent",
        dclw_sigma: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_contrastive_loss(loss, dclw_sigma)
        self.temperature, self.loss_name, self.dclw_sigma = temperature, loss, dclw_sigma
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, num_layers=2)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(torch.cat([view1, view2]))
        z1, z2 = self.projector(features).chunk(2)
        loss = nt_xent_loss(z1, z2, self.temperature, self.loss_name, self.dclw_sigma)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features[: view1.shape[0]].detach()}
