"""MAE (He, Chen, Xie, Li, Dollar, Girshick 2022, "Masked Autoencoders Are Scalable Vision Learners").

Mask a large random subset of patches (75%), encode only the visible ones with a ViT, let a lightweight
decoder fill in mask tokens, and regress the pixels of the hidden patches (optionally per-patch
normalized). One view per image (random resized crop + flip); several views are treated as more samples.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback

from ssl_lightning.callbacks.mae_reconstruction import MAEReconstructionLogger
from ssl_lightning.losses.mae import mae_loss, normalize_patches
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn.masking import default_mask_seed, step_generator
from ssl_lightning.nn.vit_mae import MAEDecoder, patchify, unpatchify


class MAE(SSLMethod):
    """Args (besides ``SSLMethod``'s; ``backbone`` must be a masked ViT, ``mae_vit_*``):
        mask_ratio: share of the patches hidden from the encoder.
        norm_pix_loss: regress each hidden patch normalized by its own mean and std.
        decoder_dim, decoder_depth, decoder_num_heads: the decoder's width, blocks and heads.
        mask_seed: seed of the masks (default: the global seed); each step's mask generator is seeded
            from (seed, rank, step), so ranks differ and a resumed run draws the same masks.

    ``forward(images)`` is the encoder's class-token feature on the full image (no masking); the
    ``features`` a training step returns for the online probe are those of the masked images.
    ``compile_backbone`` compiles only that full-image forward.
    """

    def __init__(
        self,
        backbone: str = "mae_vit_base",
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, **kwargs)
        if not hasattr(self.backbone, "forward_masked"):
            raise ValueError(f"MAE needs a masked ViT backbone (mae_vit_tiny/small/base/large), got {backbone!r}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.mask_seed = default_mask_seed(mask_seed)
        self.patch_size = self.backbone.patch_size
        self.decoder = MAEDecoder(
            grid_size=self.backbone.grid_size,
            encoder_dim=self.backbone.feature_dim,
            patch_dim=self.patch_size**2 * self.backbone.in_chans,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
        )

    def masked_loss(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode: (loss, predicted patches, mask, encoder latent)."""
        latent, mask, ids_restore = self.backbone.forward_masked(self.to_memory_format(images), self.mask_ratio, generator)
        pred = self.decoder(latent, ids_restore)
        return mae_loss(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss), pred, mask, latent

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        generator = self._generator(views[0].device, self.global_rank, self.trainer.global_step, micro_batch)
        loss, _, _, latent = self.masked_loss(torch.cat(views), generator)
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": self.backbone.pool(latent[: views[0].shape[0]]).detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Full-image features, and ``val/loss`` (``test/loss`` when testing) under masks fixed by the batch
        index, so values are comparable across epochs."""
        loss = self.masked_loss(batch["image"], self._generator(batch["image"].device, batch_idx))[0]
        self.log("test/loss" if self.trainer.testing else "val/loss", loss, sync_dist=True)
        return super().validation_step(batch, batch_idx)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's images (B, C, H, W), in the input's normalization, and the mask image (B, 1, H, W),
        1 on hidden pixels. With ``norm_pix_loss`` each predicted patch is un-normalized with the true
        patch's mean and std, as the paper's visualizations."""
        _, pred, mask, _ = self.masked_loss(images, generator)
        if self.norm_pix_loss:
            _, mean, std = normalize_patches(patchify(images, self.patch_size))
            pred = pred * std + mean
        mask_patches = mask[..., None].expand(-1, -1, self.patch_size**2)
        return unpatchify(pred, self.patch_size), unpatchify(mask_patches, self.patch_size)

    def configure_callbacks(self) -> list[Callback]:
        return [MAEReconstructionLogger()]

    def _generator(self, device: torch.device, *key: int) -> torch.Generator:
        return step_generator(device, self.mask_seed, *key)
