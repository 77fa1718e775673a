"""AIM (El-Nouby, Klein, Zhai, Bautista, Toshev, Shankar, Susskind, Joulin 2024, "Scalable Pre-training of Large
Autoregressive Image Models").

Split the image into patches in raster order; a ViT without a class token reads them with prefix-causal attention
(a random prefix of ``S`` patches per image attends bidirectionally, every later patch causally); a token-level MLP
head turns each token into the pixels of the NEXT patch; the loss is the squared error against per-patch
normalized pixels on the patches after the prefix (section 3, figure 2). Downstream the same ViT runs with
bidirectional attention (the prefix objective is what makes dropping the mask work).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ssl_lightning.backbones import check_divisible, require_vit
from ssl_lightning.losses.aim import aim_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import AIMHead
from ssl_lightning.nn.masking import default_mask_seed, step_generator
from ssl_lightning.nn.masking.prefix import prefix_causal_mask, random_prefix_lengths
from ssl_lightning.nn.pos_embed import sincos_pos_embed_2d
from ssl_lightning.nn.vit_mae import patchify


class AIM(SSLMethod):
    """Args (besides ``SSLMethod``'s; ``backbone`` must be a timm ViT, ``vit_*``):
        head_dim, head_blocks, head_mlp_ratio: the MLP head's width, residual blocks and expansion (the paper's
            AIM-0.6B: 2048, 12, 4).
        norm_pix_loss: regress each patch normalized by its own mean and std (the paper's target).
        prefix_seed: seed of the prefix lengths (default: the global seed); each step's lengths are drawn from a
            generator seeded with (seed, rank, step, micro-batch), so ranks differ and a resumed run draws the same.

    The ViT has no class token: ``backbone_kwargs`` must set ``class_token: false, global_pool: avg`` (they are
    saved with the checkpoint, so eval and export rebuild the same timm model); ``fc_norm: false`` (the configs')
    makes timm apply its final norm to every token, so the head reads normalized tokens and the feature is their
    mean, as the paper's trunk (with timm's default ``fc_norm`` the norm comes after the pooling instead).
    ``forward(images)`` is the evaluation feature: bidirectional attention (no mask), the mean of the patch tokens
    after the final norm. The paper evaluates with an attentive probe (a learned attention pooling over the patch
    tokens) instead; the mean is what the kNN monitor, linear probe and export use here. The ``features`` a training step returns for the online probe are the mean patch tokens of
    its prefix-causal pass (no second forward). The trunk keeps timm's learned positions (the paper uses fixed
    sin-cos ones); the head's input gets fixed 2D sin-cos positions, as the paper's.
    """

    def __init__(
        self,
        backbone: str = "vit_large",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        head_dim: int = 2048,
        head_blocks: int = 12,
        head_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        prefix_seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        kwargs_given = backbone_kwargs or {}
        if backbone.startswith("vit_") and (kwargs_given.get("class_token", True) or kwargs_given.get("global_pool") != "avg"):
            raise ValueError(  # timm's defaults are a class token and its pooling; the paper's ViT has none
                f"AIM uses a ViT without class token, pooled by the mean patch token: set backbone_kwargs class_token: "
                f"false, global_pool: avg (and fc_norm: false); got class_token={kwargs_given.get('class_token', True)!r}, "
                f"global_pool={kwargs_given.get('global_pool', 'token')!r}"
            )
        super().__init__(backbone=backbone, backbone_kwargs=backbone_kwargs, **kwargs)
        vit = require_vit(self.backbone, "AIM", backbone)
        if head_dim < 1 or head_blocks < 0 or head_mlp_ratio <= 0:
            raise ValueError(
                f"AIM's head needs head_dim >= 1, head_blocks >= 0 and head_mlp_ratio > 0, got head_dim={head_dim}, "
                f"head_blocks={head_blocks}, head_mlp_ratio={head_mlp_ratio}"
            )
        if vit.embed_dim % 4:
            raise ValueError(f"AIM's sin-cos head positions need an embed_dim divisible by 4, got {vit.embed_dim}")
        self.norm_pix_loss = norm_pix_loss
        self.prefix_seed = default_mask_seed(prefix_seed)
        self.head = AIMHead(vit.embed_dim, vit.patch_size**2 * vit.model.patch_embed.proj.in_channels, head_dim,
                            head_blocks, head_mlp_ratio)

    def setup(self, stage: str) -> None:
        recipe = getattr(getattr(self.trainer, "datamodule", None), "views", None)
        if stage != "fit" or recipe is None:
            return
        check_divisible(recipe.size, self.backbone.patch_size, "data.init_args.views.size")
        if recipe.num_local:
            raise ValueError(
                f"AIM trains on global views of one size; set data.init_args.views.num_local: 0 (got {recipe.num_local})"
            )

    def autoregressive_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix-causal encoding and next-patch regression: (loss, encoded tokens)."""
        vit = self.backbone
        tokens = vit.embed(images)  # (B, prefix tokens + N, D), patches in raster order
        num_patches = tokens.shape[1] - vit.num_prefix_tokens
        prefix = random_prefix_lengths(images.shape[0], num_patches, generator, images.device)
        # register tokens, if any, come first and belong to the bidirectional prefix
        tokens = vit.encode(tokens, prefix_causal_mask(prefix + vit.num_prefix_tokens, tokens.shape[1]))
        patch_tokens = vit.patch_tokens(tokens)
        pred = self.head(patch_tokens[:, :-1] + self.head_positions(images)[:-1].to(patch_tokens))
        return aim_loss(pred, patchify(images, vit.patch_size), prefix, self.norm_pix_loss), tokens

    def head_positions(self, images: torch.Tensor) -> torch.Tensor:
        """Fixed 2D sin-cos positions (N, D) of the patches, added to the tokens before the head."""
        rows, cols = self.backbone.grid_size(images)
        if rows != cols:
            raise ValueError(f"AIM's head positions need square images, got {images.shape[-2]}x{images.shape[-1]}")
        return sincos_pos_embed_2d(self.backbone.embed_dim, rows).to(images.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        if len({tuple(view.shape) for view in views}) != 1:
            raise ValueError(f"AIM needs views of one size, got shapes {[tuple(v.shape) for v in views]}")
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        generator = self._generator(views[0].device, self.global_rank, self.trainer.global_step, micro_batch)
        loss, tokens = self.autoregressive_loss(torch.cat(views), generator)  # several views: more images
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "features": self.backbone.pool(tokens[: views[0].shape[0]]).detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Bidirectional features, and ``val/loss`` (``test/loss`` when testing) under prefixes fixed by the batch
        index, so values are comparable across epochs."""
        loss = self.autoregressive_loss(batch["image"], self._generator(batch["image"].device, batch_idx))[0]
        self.log("test/loss" if self.trainer.testing else "val/loss", loss, sync_dist=True)
        return super().validation_step(batch, batch_idx)

    def _generator(self, device: torch.device, *key: int) -> torch.Generator:
        return step_generator(device, self.prefix_seed, *key)
