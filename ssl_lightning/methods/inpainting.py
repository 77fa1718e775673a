"""Inpainting with context encoders (Pathak, Krähenbühl, Donahue, Darrell, Efros 2016, "Context Encoders:
Feature Learning by Inpainting"): hide a region of the image and reconstruct it from its surroundings."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ssl_lightning.losses import hidden_region_mse
from ssl_lightning.methods.pretext import PretextMethod
from ssl_lightning.transforms.pretext import center_mask, random_boxes_mask


class Inpainting(PretextMethod):
    """Args (besides ``SSLMethod``'s):
        mask: ``"center"`` (a central square, the paper's main setting) or ``"random_boxes"`` (several
            possibly overlapping squares at random places, drawn per sample).
        hole_fraction: side of each square as a fraction of the image side (1/2: a quarter of the area).
        num_boxes: squares per image with ``random_boxes``.

    The hole is filled with 0, the dataset's mean colour in normalized space; the backbone encodes the
    masked view and a decoder of up-convolutions reconstructs the image from the backbone's feature map.
    The loss is the L2 reconstruction loss on the hidden pixels only (eq. 1). Not implemented: the
    optional adversarial loss (eq. 2-3), the channel-wise fully connected bottleneck, and the paper's
    weighted overlap band around the hole. The probe's features come from a no-gradient pass on the
    unmasked view. Logs ``train/hole_mse_ratio``: the loss divided by that of filling the hole with the
    mean colour (1: no better than the fill).
    """

    def __init__(
        self,
        mask: Literal["center", "random_boxes"] = "center",
        hole_fraction: float = 0.5,
        num_boxes: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mask not in ("center", "random_boxes"):
            raise ValueError(f"mask must be 'center' or 'random_boxes', got {mask!r}")
        self.mask, self.hole_fraction, self.num_boxes = mask, hole_fraction, num_boxes
        self.decoder = self.pixel_decoder(3)

    def hole(self, view: torch.Tensor) -> torch.Tensor:
        """The (B, 1, H, W) mask of hidden pixels for this batch."""
        b, _, height, width = view.shape
        if self.mask == "center":
            return center_mask(b, height, width, self.hole_fraction, view.device)
        generator = self.task_generator(view.device)
        return random_boxes_mask(b, height, width, self.hole_fraction, self.num_boxes, generator)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view = self.single_view(batch)
        hidden = self.hole(view)
        reconstruction = self.decoder(self.feature_map(view.masked_fill(hidden, 0.0)), size=view.shape[-2:])
        loss = hidden_region_mse(reconstruction, view, hidden)
        with torch.no_grad():
            features = self(view)
            fill_loss = hidden_region_mse(torch.zeros_like(view), view, hidden)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/hole_mse_ratio", loss.detach() / fill_loss, prog_bar=True)
        return {"loss": loss, "features": features}
