"""The pieces of a masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The encoder is a ViT (Dosovitskiy et al. 2021) with pre-norm blocks and fixed 2D sin-cos positions that,
in ``forward_masked``, sees only the visible patches; the lightweight decoder appends a shared mask token
for every hidden patch, restores the patch order and predicts each patch's pixels. Layout, masking and
initialization follow the official code (facebookresearch/mae, ``models_mae.py``).
"""

from __future__ import annotations

from functools import partial
from typing import Literal, Optional

import torch
from torch import nn

from ssl_lightning.nn.pos_embed import sincos_pos_embed_2d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch_size**2 * C): patches row-major, pixels inside a patch as (p, q, c)."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch_size) * (w // patch_size), patch_size**2 * c)


def unpatchify(patches: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of ``patchify`` for a square grid: (B, N, p*p*C) -> (B, C, H, W)."""
    b, n, d = patches.shape
    grid = int(round(n**0.5))
    if grid * grid != n or d % (patch_size**2):
        raise ValueError(f"patches of shape {tuple(patches.shape)} are not a square grid of {patch_size}x{patch_size} patches")
    c = d // patch_size**2
    x = patches.reshape(b, grid, grid, patch_size, patch_size, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, grid * patch_size, grid * patch_size)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: ``int(N * (1 - mask_ratio))``, the same in every sample (MAE's ``len_keep``)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of ``num_visible`` tokens per sample, by argsort of per-sample uniform noise.

    Returns the visible tokens (B, keep, D) in shuffled order, the binary ``mask`` (B, N) with 1 on hidden
    patches, and ``ids_restore`` (B, N) that puts a shuffled sequence back in patch order.
    """
    b, n, d = tokens.shape
    keep = num_visible(n, mask_ratio)
    noise = torch.rand(b, n, device=tokens.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device, dtype=tokens.dtype)
    mask[:, :keep] = 0
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def vit_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """``depth`` pre-norm transformer blocks (timm's ``Block``, imported here: timm is slow to import)."""
    from timm.models.vision_transformer import Block

    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
    )


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialization: Xavier-uniform linear layers with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskedViTEncoder(nn.Module):
    """ViT encoder of MAE: patch embedding, class token, fixed 2D sin-cos positions, pre-norm blocks.

    ``forward(images)`` is the backbone's feature on the FULL image (no masking), ``(B, feature_dim)``:
    the class token after the final norm (``global_pool="cls"``, as MAE's linear probing) or the mean of
    the normed patch tokens (``"mean"``). ``forward_masked`` runs on the visible patches only.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        global_pool: Literal["cls", "mean"] = "cls",
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if global_pool not in ("cls", "mean"):
            raise ValueError(f"global_pool must be 'cls' or 'mean', got {global_pool!r}")
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.global_pool = global_pool
        self.feature_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid_size, cls_token=True)[None])
        self.blocks = vit_blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(embed_dim)
        self.apply(init_vit_weights)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(embed_dim, -1))  # as a linear layer
        nn.init.normal_(self.cls_token, std=0.02)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images -> (B, N, D) patch tokens with their positions added."""
        expected = (self.in_chans, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"MaskedViTEncoder expects images of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")
        return self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]

    def encode(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and run the blocks: (B, n, D) -> (B, 1 + n, D), normed."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patch_tokens.shape[0], -1, -1)
        x = torch.cat([cls, patch_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_masked(
        self, images: torch.Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches of a random mask: latent (B, 1 + keep, D), mask (B, N), ids_restore (B, N)."""
        visible, mask, ids_restore = random_masking(self.embed_patches(images), mask_ratio, generator)
        return self.encode(visible), mask, ids_restore

    def pool(self, latent: torch.Tensor) -> torch.Tensor:
        """The pooled feature (B, D) of an encoded sequence (B, 1 + n, D)."""
        return latent[:, 0] if self.global_pool == "cls" else latent[:, 1:].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encode(self.embed_patches(images)))


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: project the encoder's tokens, append a shared learned mask token for
    each hidden patch, unshuffle, add fixed sin-cos positions, pre-norm blocks, predict each patch's
    ``patch_dim`` pixel values. Returns (B, N, patch_dim), the class token dropped."""

    def __init__(
        self,
        grid_size: int,
        encoder_dim: int,
        patch_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid_size, cls_token=True)[None])
        self.blocks = vit_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        b, n = ids_restore.shape
        hidden = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], hidden], dim=1)  # shuffled order: visible first
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]
