"""Colorization (Zhang, Isola, Efros 2016, "Colorful Image Colorization"): predict the ab colour channels
of CIE Lab from the lightness L."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from ssl_lightning.methods.pretext import PretextMethod
from ssl_lightning.transforms.pretext import ab_bin_lookup, ab_gamut_bins, ab_to_bins, rgb_to_lab
from ssl_lightning.transforms.simclr import CIFAR10_MEAN, CIFAR10_STD

AB_SCALE = 110.0  # ab divided by this lies within about [-1, 1]: the regression target
SMOOTH_L1_BETA = 5.0 / AB_SCALE  # smooth-L1 is quadratic below 5 Lab units of error, linear above


class Colorization(PretextMethod):
    """Args (besides ``SSLMethod``'s):
        mode: ``"regression"`` of ab (the default), or ``"classification"`` over the quantized ab gamut
            (the paper's formulation, eq. 2, with hard nearest-bin targets: no soft encoding, no class
            rebalancing).
        regression_loss: ``"smooth_l1"`` or ``"mse"`` on ab / 110.
        grid_size: side of the ab bins in classification mode (10: 261 in-gamut bins).

    The backbone sees only lightness: L, centred and scaled to [-1, 1], replicated to the 3 input
    channels. ``forward(images)`` converts its (normalized RGB) images the same way, so the probe and
    kNN see what the backbone was trained on. A decoder upsamples the backbone's feature map to a
    per-pixel prediction at the input resolution. Normalized views are turned back into RGB with the
    datamodule's ``mean``/``std``, copied into buffers at ``setup`` (CIFAR-10's until then; saved in
    checkpoints). Logs ``train/ab_error``: the mean Euclidean ab error per pixel, in Lab units (for
    classification, of the most likely bin's centre).
    """

    def __init__(
        self,
        mode: Literal["regression", "classification"] = "regression",
        regression_loss: Literal["smooth_l1", "mse"] = "smooth_l1",
        grid_size: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in ("regression", "classification"):
            raise ValueError(f"mode must be 'regression' or 'classification', got {mode!r}")
        if regression_loss not in ("smooth_l1", "mse"):
            raise ValueError(f"regression_loss must be 'smooth_l1' or 'mse', got {regression_loss!r}")
        self.mode, self.regression_loss, self.grid_size = mode, regression_loss, grid_size
        self.register_buffer("pixel_mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        out_channels = 2
        if mode == "classification":
            self.register_buffer("ab_bins", ab_gamut_bins(grid_size))
            self.register_buffer("ab_lookup", ab_bin_lookup(self.ab_bins, grid_size))
            out_channels = self.ab_bins.shape[0]
        self.decoder = self.pixel_decoder(out_channels)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and std is not None:
            self.pixel_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.pixel_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def to_lab(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized RGB images -> Lab (B, 3, H, W)."""
        return rgb_to_lab((images * self.pixel_std + self.pixel_mean).clamp(0, 1))

    @staticmethod
    def lightness_input(lab: torch.Tensor) -> torch.Tensor:
        """The backbone's input: L / 50 - 1 replicated to 3 channels."""
        return (lab[:, :1] / 50 - 1).repeat(1, 3, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of the lightness of ``images`` (normalized RGB)."""
        return self.backbone(self.to_memory_format(self.lightness_input(self.to_lab(images))))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        view = self.single_view(batch)
        with torch.no_grad():
            lab = self.to_lab(view)
        ab = lab[:, 1:]
        feature_map = self.feature_map(self.lightness_input(lab))
        prediction = self.decoder(feature_map, size=view.shape[-2:])
        if self.mode == "regression":
            target = ab / AB_SCALE
            if self.regression_loss == "smooth_l1":
                loss = F.smooth_l1_loss(prediction, target, beta=SMOOTH_L1_BETA)
            else:
                loss = F.mse_loss(prediction, target)
            predicted_ab = prediction.detach() * AB_SCALE
        else:
            loss = F.cross_entropy(prediction, ab_to_bins(ab, self.ab_lookup, self.grid_size))
            predicted_ab = self.ab_bins[prediction.detach().argmax(dim=1)].permute(0, 3, 1, 2)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ab_error", (predicted_ab - ab).norm(dim=1).mean(), prog_bar=True)
        return {"loss": loss, "features": feature_map.detach().mean(dim=(-2, -1))}
