"""Rotation prediction (Gidaris, Singh, Komodakis 2018, "Unsupervised Representation Learning by
Predicting Image Rotations"): every image in all four rotations, a 4-way classifier on the features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_lightning.methods.pretext import PretextMethod, top1_accuracy
from ssl_lightning.nn import MLPHead
from ssl_lightning.transforms.pretext import NUM_ROTATIONS, rotate_batch


class Rotation(PretextMethod):
    """Args (besides ``SSLMethod``'s):
        head_layers: layers of the rotation classifier on the pooled features (1: linear; the paper's
            classifier is the network's last block, here the backbone, followed by a linear layer).
        head_hidden_dim: hidden width when ``head_layers > 1``.

    A batch of B views becomes 4B images: all rotations of an image in the same batch, which the paper
    found better than one random rotation per image. The probe's features are those of the unrotated
    quarter. Logs ``train/rotation_acc``.
    """

    def __init__(self, head_layers: int = 1, head_hidden_dim: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head = MLPHead(self.backbone.feature_dim, head_hidden_dim, NUM_ROTATIONS, num_layers=head_layers)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view = self.single_view(batch)
        rotated, labels = rotate_batch(view)
        features = self(rotated)
        logits = self.head(features)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/rotation_acc", top1_accuracy(logits.detach(), labels), prog_bar=True)
        return {"loss": loss, "features": features[: view.shape[0]].detach()}
