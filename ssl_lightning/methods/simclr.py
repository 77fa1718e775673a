"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of
Visual Representations"): two views, a projection head, NT-Xent over the global batch; with ``loss: dcl`` /
``dclw`` it is DCL / DCLW (Yeh et al. 2022, "Decoupled Contrastive Learning")."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ssl_lightning.losses import nt_xent_loss
from ssl_lightning.losses.dcl import ContrastiveLoss, check_contrastive_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class SimCLR(SSLMethod):
    """Args (besides ``SSLMethod``'s): projector sizes and the temperature; ``loss``: ``nt_xent`` (SimCLR),
    ``dcl`` (the positive pair left out of the denominator) or ``dclw`` (also the positive term weighted by a
    von Mises-Fisher kernel of width ``dclw_sigma``, 0.5 in the paper).

    ``view_batch_norm``: which images share BatchNorm statistics. ``joined`` (default): both views in one batch
    through the backbone and projector, as the paper's code (its global BatchNorm pools both views). ``separate``:
    one call per view, each view with its own statistics, as lightly's and solo-learn's SimCLR; on CPUs whose cache
    the joined batch's activations overflow it is faster (``benchmarks/peers.py``)."""

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.5,
        loss: ContrastiveLoss = "nt_xent",
        dclw_sigma: float = 0.5,
        view_batch_norm: Literal["joined", "separate"] = "joined",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if view_batch_norm not in ("joined", "separate"):
            raise ValueError(f"view_batch_norm must be 'joined' or 'separate', got {view_batch_norm!r}")
        self.view_batch_norm = view_batch_norm
        check_contrastive_loss(loss, dclw_sigma)
        self.temperature, self.loss_name, self.dclw_sigma = temperature, loss, dclw_sigma
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, num_layers=2)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        if self.view_batch_norm == "joined":
            features = self(torch.cat([view1, view2]))
            z1, z2 = self.projector(features).chunk(2)
        else:
            features = self(view1)
            z1, z2 = self.projector(features), self.projector(self(view2))
        loss = nt_xent_loss(z1, z2, self.temperature, self.loss_name, self.dclw_sigma)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features[: view1.shape[0]].detach()}  # the first view's
