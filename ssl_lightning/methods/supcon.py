"""SupCon (Khosla et al. 2020, "Supervised Contrastive Learning"): SimCLR's two views and projector with the
labels deciding the positives; the supervised baseline of a comparison table (it needs labelled data)."""

from __future__ import annotations

from typing import Any

import torch

from ssl_lightning.losses.supcon import check_labelled, supcon_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class SupCon(SSLMethod):
    """Args (besides ``SSLMethod``'s): projector sizes (2048 -> 128, the paper's) and the temperature (0.1)."""

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, num_layers=2)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "num_classes", None) is None:
            raise ValueError(f"SupCon needs labelled images: data {type(datamodule).__name__} has no labels "
                             f"(num_classes is None); use labelled data, e.g. an ImageFolder with class folders")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Every training image has a label: checked here, on the host, before the batch reaches the device."""
        if self._trainer is not None and self._trainer.training:
            check_labelled(batch["label"])
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view1, view2 = self.two_views(batch)
        features = self(torch.cat([view1, view2]))
        z1, z2 = self.projector(features).chunk(2)
        loss = supcon_loss(z1, z2, batch["label"], self.temperature)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": features[: view1.shape[0]].detach()}
