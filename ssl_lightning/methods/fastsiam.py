"""FastSiam (Pototzky et al. 2022, "FastSiam: Resource-Efficient Self-supervised Learning on a Single GPU"):
SimSiam with K views of each image (4 in the paper), each view's prediction regressed onto the mean projection
of the other K - 1 views under stop-gradient: a steadier target per step, so small batches train well."""

from __future__ import annotations

from typing import Any

import torch

from ssl_lightning.losses.cosine import fastsiam_loss
from ssl_lightning.methods.simsiam import SimSiam


class FastSiam(SimSiam):
    """Args (besides ``SimSiam``'s, whose projector, predictor and stop-gradient it keeps): ``num_views``, K (4):
    the data must make K views (``data.init_args.views.num_views``), checked when the run starts."""

    def __init__(self, num_views: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_views < 2:
            raise ValueError(f"num_views must be at least 2 (one prediction, one target), got {num_views}")
        self.num_views = num_views

    def setup(self, stage: str) -> None:
        self.require_views(self.num_views)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        if len(views) != self.num_views:
            raise ValueError(f"FastSiam expects {self.num_views} views per image, got {len(views)}")
        features = [self(view) for view in views]  # one pass per view, as SimSiam: BatchNorm statistics per view
        z = [self.projector(f) for f in features]
        p = [self.predictor(projection) for projection in z]
        targets = [projection.detach() for projection in z] if self.stop_gradient else z
        loss = fastsiam_loss(p, targets)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features[0].detach(), "embeddings": z[0].detach()}
