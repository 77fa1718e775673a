"""I-JEPA (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture").

From one context block of an image, predict the representations of several target blocks of the same image: a
context encoder sees only the context patches (the targets removed), a narrow ViT predictor fills in each target
block from mask tokens at the target positions, and the targets are the layer-normed patch outputs of an EMA target
encoder that sees the full image. One view per image (a random resized crop) and no other augmentation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ssl_lightning.backbones import check_divisible, require_vit
from ssl_lightning.callbacks.momentum import MomentumSchedule, MomentumUpdate
from ssl_lightning.losses.ijepa import ijepa_loss, layer_normed_targets
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn.masking import default_mask_seed, step_generator
from ssl_lightning.nn.masking.multiblock import MultiBlockMasks, check_range, multiblock_masks
from ssl_lightning.nn.pos_embed import sincos_pos_embed_2d
from ssl_lightning.nn.predictor import JEPAPredictor


class IJEPA(SSLMethod):
    """Args (besides ``SSLMethod``'s; ``backbone`` must be a ViT, I-JEPA's has no [CLS]: ``backbone_kwargs``
    ``class_token: false, global_pool: avg, fc_norm: false``, so features are the mean of the normed patch tokens):
        predictor_dim, predictor_depth, predictor_num_heads: the predictor ViT (384 wide, 12 blocks for ViT-H;
            heads default to the encoder's, as the reference code).
        num_targets, target_scale, target_aspect: M = 4 target blocks of 15-20% of the patches, aspect 0.75-1.5.
        context_scale: the context block, 85-100% of the patches, square, before the targets are removed.
        min_context, mask_tries: the context safeguard (``nn/masking/multiblock.py``): each image takes the first of
            ``mask_tries`` placements whose context keeps ``min_context`` patches (the reference: min_keep 10).
        fixed_pos_embed: the encoder's position embeddings are the fixed 2D sin-cos ones, as the reference code.
        base_momentum, final_momentum, momentum_schedule: the target encoder's EMA, 0.996 -> 1 over the optimizer
            steps (cosine by default; ``linear`` is the reference code's).
        final_weight_decay: cosine weight-decay schedule from ``optim.weight_decay`` (0.04 -> 0.4); None: constant.
        mask_seed: seed of the masks (default: the global seed); each step's mask generator is seeded from
            (seed, rank, step, micro-batch), so ranks differ and a resumed run draws the same masks.

    ``forward(images)`` is the context encoder's pooled feature of the full image; the ``features`` a training step
    returns (for the online probe) are the pooled context tokens. ``MomentumUpdate`` comes with the method.
    """

    def __init__(
        self,
        backbone: str = "vit_base",
        predictor_dim: int = 384,
        predictor_depth: int = 12,
        predictor_num_heads: Optional[int] = None,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        min_context: int = 10,
        mask_tries: int = 20,
        fixed_pos_embed: bool = True,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        momentum_schedule: MomentumSchedule = "cosine",
        final_weight_decay: Optional[float] = None,
        mask_seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, **kwargs)
        vit = require_vit(self.backbone, "IJEPA", backbone)
        check_range(tuple(target_scale), "target_scale")
        check_range(tuple(context_scale), "context_scale")
        check_range(tuple(target_aspect), "target_aspect", upper=None)
        if num_targets < 1:
            raise ValueError(f"num_targets must be at least 1, got {num_targets}")
        if min_context < 1 or mask_tries < 1:
            raise ValueError(f"min_context and mask_tries must be at least 1, got {min_context} and {mask_tries}")
        if final_weight_decay is not None and self.optim.weight_decay <= 0:
            raise ValueError(f"final_weight_decay={final_weight_decay} needs optim.weight_decay > 0, "
                             f"got {self.optim.weight_decay}")
        self.mask_settings = dict(num_targets=num_targets, target_scale=tuple(target_scale),
                                  target_aspect=tuple(target_aspect), context_scale=tuple(context_scale),
                                  min_context=min_context, tries=mask_tries)
        self.base_momentum, self.final_momentum, self.momentum_schedule = base_momentum, final_momentum, momentum_schedule
        self.final_weight_decay = final_weight_decay
        self.mask_seed = default_mask_seed(mask_seed)
        grid_size = vit.model.patch_embed.grid_size[0]
        if fixed_pos_embed:
            self._fix_position_embeddings(vit, grid_size)
        self.predictor = JEPAPredictor(
            vit.embed_dim,
            grid_size,
            dim=predictor_dim,
            depth=predictor_depth,
            num_heads=predictor_num_heads or vit.model.blocks[0].attn.num_heads,
        )
        self.target_backbone = self.frozen_copy(self.backbone)

    @staticmethod
    def _fix_position_embeddings(vit: nn.Module, grid_size: int) -> None:
        """Fixed sin-cos positions for the patches (zeros for any prefix token), excluded from training."""
        pos_embed = vit.model.pos_embed
        with torch.no_grad():
            pos_embed.zero_()
            pos_embed[0, -grid_size**2 :] = sincos_pos_embed_2d(pos_embed.shape[-1], grid_size)
        pos_embed.requires_grad_(False)

    def optimized_modules(self) -> list[nn.Module]:
        return [self.backbone, self.predictor]

    def configure_callbacks(self) -> list[Callback]:
        return [MomentumUpdate([("backbone", "target_backbone")], self.base_momentum, self.final_momentum,
                               self.momentum_schedule)]

    def setup(self, stage: str) -> None:
        views = getattr(getattr(self.trainer, "datamodule", None), "views", None)
        if views is not None:
            check_divisible(views.size, self.backbone.patch_size, "data.views.size")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.schedule_weight_decay(self.final_weight_decay)

    def sample_masks(self, images: torch.Tensor, generator: torch.Generator) -> MultiBlockMasks:
        """Context and target blocks for every image of the batch (the same counts in every image), drawn from
        ``generator`` (on the CPU in training: a few small tensors and host reads, which on a GPU would each wait
        for the device) and moved to the images' device."""
        masks = multiblock_masks(images.shape[0], self.backbone.grid_size(images), generator, **self.mask_settings)
        return masks.to(images.device)

    def encode_context(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The context encoder's outputs (B, prefix + n, D) on the context patches ``context`` (B, n) only (and any
        prefix token): the other patches are dropped after the patch embedding, before any block."""
        tokens = self.backbone.keep_patches(self.backbone.embed(self.to_memory_format(images)), context)
        return self.backbone.encode(tokens)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, target_indices: torch.Tensor) -> torch.Tensor:
        """The target encoder's outputs on the full image, layer-normed, at the target patches: (B, M, t, D)."""
        tokens = self.target_backbone.encode(self.target_backbone.embed(self.to_memory_format(images)))
        return layer_normed_targets(self.target_backbone.patch_tokens(tokens), target_indices)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        if any(view.shape[1:] != views[0].shape[1:] for view in views):
            raise ValueError(f"IJEPA trains on single crops of one size (data.views.num_local: 0), got shapes "
                             f"{[tuple(v.shape) for v in views]}")
        images = torch.cat(views)  # several views are treated as more images
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        generator = step_generator(torch.device("cpu"), self.mask_seed, self.global_rank, self.trainer.global_step, micro_batch)
        masks = self.sample_masks(images, generator)
        context = self.encode_context(images, masks.context)
        predictions = self.predictor(
            self.backbone.patch_tokens(context), masks.context, masks.targets, self.backbone.grid_size(images)[0]
        )
        loss = ijepa_loss(predictions, self.targets(images, masks.targets))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/context_patches", float(masks.context.shape[1]), on_step=True, on_epoch=False)
        self.log("train/target_patches", float(masks.targets.shape[2]), on_step=True, on_epoch=False)
        features = self.backbone.pool(context[: views[0].shape[0]])
        return {"loss": loss, "features": features.detach()}
