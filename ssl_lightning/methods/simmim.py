"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling").

Mask random 32 px patches of the image (ratio 0.6), let the whole image (masked patches replaced by a learned
mask token) run through the encoder, predict every pixel with one linear layer per output position (a 1x1 conv to
``stride^2 * 3`` values, pixel-shuffled back to the image), and take the L1 loss on the masked pixels only.
Works with ViTs and with convolutional backbones (ResNets: any backbone with ``feature_map``/``feature_stride``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ssl_lightning.backbones import TimmViT
from ssl_lightning.losses.simmim import simmim_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn.masking import default_mask_seed, step_generator
from ssl_lightning.nn.masking.coarse import coarse_random_mask, upsample_mask


class SimMIM(SSLMethod):
    """Args (besides ``SSLMethod``'s; ``backbone`` a ViT (``vit_*``) or a ResNet):
        mask_patch_size: side in pixels of the square mask patches (32); a multiple of the ViT's patch size, or of
            the convolutional backbone's ``feature_stride``, that divides the image size.
        mask_ratio: share of the mask patches masked in every image (0.6); ``round(ratio * mask patches)`` of them
            (the reference code takes the ceiling: the same count at its settings, 0.6 x 36 or 0.6 x 49).
        mask_seed: seed of the masks (default: the global seed); each step's generator is seeded from
            (seed, rank, step, micro-batch), so ranks differ and a resumed run draws the same masks.

    Where the mask token goes:
      ViT: after the patch embedding, before the positions (the paper's ViT): ``TimmViT.embed(images, mask,
        mask_token)`` with a learned ``embed_dim`` token; the head reads the patch outputs (stride = patch size).
      ConvNet: at the input. Masked pixels are replaced by a learned per-channel (RGB) token before the stem, and
        the head reads the last feature map (stride = ``feature_stride``). The paper masks right after Swin's
        patch embedding, a non-overlapping conv, so no masked pixel reaches any visible position. A ResNet's stem
        (7x7 conv stride 2 + 3x3 max-pool, or the CIFAR 3x3 conv) overlaps: masking its output would let masked
        pixels leak into the visible positions along every mask border. Masking the input keeps them out
        entirely, and a learned token (not black, not zero) still tells the network where the mask is.

    ``forward(images)`` is the backbone's feature of the full, unmasked image; the ``features`` a training step
    returns for the online probe are those of the masked images (as MAE's).
    """

    def __init__(
        self,
        backbone: str = "vit_base",
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        mask_seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, **kwargs)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.is_vit = isinstance(self.backbone, TimmViT)
        if self.is_vit:
            self.stride, what = self.backbone.patch_size, "the ViT's patch size"
            channels = self.backbone.embed_dim
            self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(channels), std=0.02, a=-0.02, b=0.02))
        elif hasattr(self.backbone, "feature_map") and getattr(self.backbone, "feature_stride", None):
            self.stride, what = self.backbone.feature_stride, "the backbone's feature_stride"
            channels = self.backbone.feature_dim
            self.mask_token = nn.Parameter(torch.zeros(3))  # an RGB value, at the input (the data's mean at start)
        else:
            raise ValueError(f"SimMIM needs a ViT or a backbone with feature_map()/feature_stride (a ResNet), got "
                             f"backbone={backbone!r}")
        if mask_patch_size < self.stride or mask_patch_size % self.stride:
            raise ValueError(f"mask_patch_size={mask_patch_size} must be a multiple of {what} {self.stride}")
        if self.is_vit:
            image_size = self.backbone.model.patch_embed.img_size[0]
            if image_size % mask_patch_size:
                raise ValueError(f"backbone_kwargs.image_size={image_size} is not divisible by "
                                 f"mask_patch_size={mask_patch_size}")
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio
        self.mask_seed = default_mask_seed(mask_seed)
        # the one-layer prediction head: a linear map of each output position to its stride x stride x 3 pixels
        self.head = nn.Sequential(nn.Conv2d(channels, self.stride**2 * 3, kernel_size=1), nn.PixelShuffle(self.stride))

    def setup(self, stage: str) -> None:
        views = getattr(getattr(self.trainer, "datamodule", None), "views", None)
        if views is None:
            return
        if views.size % self.mask_patch_size:
            raise ValueError(f"data.init_args.views.size={views.size} is not divisible by mask_patch_size="
                             f"{self.mask_patch_size}")
        if views.num_local:
            raise ValueError(f"SimMIM trains on global views of one size; set data.init_args.views.num_local: 0 "
                             f"(got {views.num_local})")

    def draw_mask(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, rows, cols) bool on the model's grid (patches, or feature-map positions), True where masked: random
        mask patches, each covering (mask_patch_size / stride)^2 positions."""
        height, width = images.shape[-2:]
        if height % self.mask_patch_size or width % self.mask_patch_size:
            raise ValueError(f"image size {height}x{width} (data.init_args.views.size) is not divisible by "
                             f"mask_patch_size={self.mask_patch_size}")
        rows, cols, factor = height // self.stride, width // self.stride, self.mask_patch_size // self.stride
        return coarse_random_mask(images.shape[0], rows, cols, factor, self.mask_ratio, generator, images.device)

    def encode_masked(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output map (B, C, rows, cols) of ``images`` with the ``mask`` (B, rows, cols) applied,
        and its pooled feature (B, feature_dim)."""
        if self.is_vit:
            tokens = self.backbone.encode(self.backbone.embed(images, mask.flatten(1), self.mask_token))
            patches = self.backbone.patch_tokens(tokens)  # (B, rows * cols, D)
            return patches.transpose(1, 2).unflatten(2, mask.shape[1:]), self.backbone.pool(tokens)
        hidden = upsample_mask(mask, self.stride).unsqueeze(1)  # (B, 1, H, W): masked pixels
        masked = torch.where(hidden, self.mask_token.view(1, -1, 1, 1).to(images.dtype), images)
        feature_map = self.backbone.feature_map(self.to_memory_format(masked))
        return feature_map, feature_map.mean(dim=(-2, -1))

    def masked_loss(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Mask, encode, predict the pixels: loss, prediction (B, 3, H, W), pixel mask (B, H, W), features."""
        mask = self.draw_mask(images, generator)
        feature_map, features = self.encode_masked(images, mask)
        pred = self.head(feature_map)
        pixel_mask = upsample_mask(mask, self.stride)
        return {"loss": simmim_loss(pred, images, pixel_mask), "pred": pred, "mask": pixel_mask, "features": features}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]  # one view per image; several same-size views are more samples
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        generator = self._generator(views[0].device, self.global_rank, self.trainer.global_step, micro_batch)
        out = self.masked_loss(torch.cat(views), generator)
        self.log("train/loss", out["loss"], prog_bar=True)
        return {"loss": out["loss"], "features": out["features"][: views[0].shape[0]].detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Full-image features, and ``val/loss`` (``test/loss`` when testing) under masks fixed by the batch index."""
        loss = self.masked_loss(batch["image"], self._generator(batch["image"].device, batch_idx))["loss"]
        self.log("test/loss" if self.trainer.testing else "val/loss", loss, sync_dist=True)
        return super().validation_step(batch, batch_idx)

    def _generator(self, device: torch.device, *key: int) -> torch.Generator:
        return step_generator(device, self.mask_seed, *key)
