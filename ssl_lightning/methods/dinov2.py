"""DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision", sec. 4): iBOT with
separate [CLS] and patch heads, Sinkhorn-Knopp centering of the teacher (SwAV's, instead of the EMA center), the
KoLeo regulariser on the student's [CLS] features, ViTs with LayerScale and optional register tokens.

    L = L_DINO([CLS], every crop pair)  +  L_iBOT(masked patches of the global crops)  +  0.1 * L_KoLeo

The teacher's [CLS] and masked-patch outputs are each turned into assignments by 3 Sinkhorn-Knopp iterations with
``epsilon = tau_t`` (``losses.swav.sinkhorn_knopp``, sums all-reduced across ranks), and KoLeo is computed per
global crop on this rank's batch, as the reference code (facebookresearch/dinov2, train/ssl_meta_arch.py).
Everything else (masks, heads, EMA teacher, losses, schedules) is ``IBOT``'s.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ssl_lightning.losses.koleo import koleo_loss
from ssl_lightning.losses.swav import sinkhorn_knopp
from ssl_lightning.methods.ibot import IBOT
from ssl_lightning.nn.masking import PatchMasks
from ssl_lightning.nn.masking.stratified import stratified_mask_ratios
from ssl_lightning.optim import find_vit


class DINOv2(IBOT):
    """Args (besides ``IBOT``'s, whose defaults DINOv2 keeps where they agree; the ViT recipe is in the
    backbone: ``backbone_kwargs`` ``patch_size: 14``, ``init_values: 1.0e-5`` (LayerScale), ``drop_path_rate``,
    ``reg_tokens`` (Darcet et al. 2024); layer-wise lr decay is ``optim.layer_decay``):
        out_dim, patch_out_dim: prototypes of the [CLS] and patch heads (65536 each in the default recipe,
            131072 for ViT-L/14 and ViT-g/14); ``shared_head`` is False (separate heads) by default.
        norm_last_layer: False, as the reference's heads (weight norm with a trainable norm, starting at 1).
        koleo_weight: the weight of KoLeo (0.1; 0 turns it off).
        sinkhorn_iterations: Sinkhorn-Knopp iterations of the teacher's centering (3).
        base_momentum: the teacher's EMA from 0.992 (0.994 for ViT-L/14 and ViT-g/14) to 1.

    Masks are the reference collator's: ``int(mask_probability * 2B)`` of the 2B global crops masked, their ratios
    stratified over ``mask_ratio`` (``nn.masking.stratified``), blockwise. No center buffers: the teacher is
    centered by Sinkhorn-Knopp on each batch.
    """

    def __init__(
        self,
        backbone: str = "vit_large",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        out_dim: int = 65536,
        patch_out_dim: Optional[int] = None,
        shared_head: bool = False,
        norm_last_layer: bool = False,
        koleo_weight: float = 0.1,
        sinkhorn_iterations: int = 3,
        base_momentum: float = 0.992,
        **kwargs: Any,
    ) -> None:
        registers = (backbone_kwargs or {}).get("reg_tokens", 0) or 0
        if registers and not backbone.startswith("vit_"):
            raise ValueError(f"register tokens (backbone_kwargs.reg_tokens={registers}) need a timm ViT backbone "
                             f"(vit_tiny/vit_small/vit_base/vit_large), got backbone={backbone!r}")
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
        super().__init__(backbone=backbone, backbone_kwargs=backbone_kwargs, out_dim=out_dim,
                         patch_out_dim=patch_out_dim, shared_head=shared_head, norm_last_layer=norm_last_layer,
                         base_momentum=base_momentum, **kwargs)
        if self.optim.layer_decay is not None:
            find_vit([self])  # the one ViT the decay is counted on: fails now, not when training starts
        self.koleo_weight, self.sinkhorn_iterations = koleo_weight, sinkhorn_iterations
        del self.center, self.patch_center  # iBOT's EMA centers: Sinkhorn-Knopp replaces them

    def draw_mask_ratios(self, num_images: int, generator: torch.Generator) -> torch.Tensor:
        """The reference collator's ratios: exactly ``int(mask_probability * num_images)`` crops masked, their ratios
        stratified over ``mask_ratio`` (so every rank has masked patches for the Sinkhorn centering)."""
        return stratified_mask_ratios(num_images, self.mask_ratio, self.mask_probability, generator)

    @torch.no_grad()
    def teacher_cls_probabilities(self, class_tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        """Sinkhorn-Knopp assignments of the teacher's [CLS] outputs of all global crops (2B, K), ``epsilon = tau_t``."""
        return sinkhorn_knopp(self.teacher_head(class_tokens), temperature, self.sinkhorn_iterations)

    @torch.no_grad()
    def teacher_patch_probabilities(self, patch_tokens: torch.Tensor, masks: PatchMasks, temperature: float) -> torch.Tensor:
        """Sinkhorn-Knopp assignments of the teacher's patch outputs at the masked patches (M, K'): the masked
        patches of the global batch are the samples (their count is all-reduced, ranks may differ)."""
        head: nn.Module = self.teacher_head if self.teacher_patch_head is None else self.teacher_patch_head
        logits = head(patch_tokens.flatten(0, 1).index_select(0, masks.rows))
        if logits.shape[0] == 0:  # no masked patch (before mask_start_epoch): every rank alike
            return logits.float()
        return sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations)

    def extra_losses(self, student_tokens: torch.Tensor, masks: PatchMasks) -> dict[str, torch.Tensor]:
        """KoLeo on the student's [CLS] features of each global crop (never two crops of one image together),
        summed over the crops, times ``koleo_weight`` (the reference's ``0.1 * sum``)."""
        if self.koleo_weight == 0:
            return {}
        class_tokens = self.backbone.class_token(student_tokens).chunk(self.global_crops)
        return {"koleo_loss": self.koleo_weight * torch.stack([koleo_loss(c) for c in class_tokens]).sum()}
