"""A narrow ViT predictor for joint-embedding predictive architectures (I-JEPA, Assran et al. 2023, sec. 3): from the
context encoder's tokens and the positions of a target block, predict the target encoder's representation of each
patch of the block."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ssl_lightning.nn.pos_embed import sincos_pos_embed_2d


class JEPAPredictor(nn.Module):
    """Context tokens in, one prediction per target position out.

    The context tokens (encoder width) are projected to the predictor's width and given the fixed 2D sin-cos
    position of their patch; each target block adds one learned mask token per target patch, plus that patch's
    sin-cos position; the blocks run over [context, mask tokens] and the mask tokens' outputs, normalized and
    projected back to the encoder's width, are the predictions. Each target block is predicted in its own sequence
    (the context repeated per block), so the mask tokens of different blocks never attend to each other, as the
    reference code.

    Args:
        encoder_dim: width of the context tokens and of the predictions.
        grid_size: patches per side of the square grid the positions refer to.
        dim, depth, num_heads, mlp_ratio: the predictor's ViT (I-JEPA: 384 wide, 6-12 blocks).
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: int,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads or dim % 4:
            raise ValueError(f"predictor dim {dim} must be divisible by 4 and by num_heads={num_heads}")
        self.grid_size = grid_size
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid_size), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=norm) for rate in rates
        )
        self.norm = norm(dim)
        self.proj = nn.Linear(dim, encoder_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated normal (std 0.02) linear weights and mask token, zero biases; each block's residual output
        projections divided by sqrt(2 * layer), as the reference predictor."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def positions(self, grid_size: int) -> torch.Tensor:
        """(grid_size**2, dim) sin-cos positions of a square grid (cached for the default grid)."""
        if grid_size == self.grid_size:
            return self.pos_embed
        return sincos_pos_embed_2d(self.pos_embed.shape[1], grid_size).to(self.pos_embed.device)

    def forward(
        self,
        context: torch.Tensor,
        context_indices: torch.Tensor,
        target_indices: torch.Tensor,
        grid_size: Optional[int] = None,
    ) -> torch.Tensor:
        """Predictions of the target patches.

        Args:
            context: (B, n, encoder_dim) the context encoder's patch tokens.
            context_indices: (B, n) their patch indices (row-major).
            target_indices: (B, M, t) patch indices of M target blocks per image, or (B, t) for one.
            grid_size: patches per side of the images (default: the constructor's).

        Returns (B, M, t, encoder_dim), or (B, t, encoder_dim) for (B, t) targets.
        """
        single = target_indices.ndim == 2
        targets = target_indices[:, None] if single else target_indices
        batch, blocks, per_block = targets.shape
        positions = self.positions(grid_size or self.grid_size).to(context.dtype)
        x = self.embed(context) + positions[context_indices]
        x = x.repeat_interleave(blocks, dim=0)  # (B * M, n, dim): image b's context for each of its blocks
        queries = self.mask_token.to(x.dtype) + positions[targets.reshape(batch * blocks, per_block)]
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        predictions = self.proj(self.norm(x[:, -per_block:]))
        predictions = predictions.reshape(batch, blocks, per_block, -1)
        return predictions[:, 0] if single else predictions
