"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer"): DINO's self-distillation of
the [CLS] token across views plus masked image modelling with an online tokenizer: the student sees the global
crops with blockwise masks and predicts, at each masked patch, the EMA teacher's output for the same patch of
the unmasked crop (sec. 3.2, algorithm 1).

``training_step`` is built from small methods, the override points of DINOv2 (``methods/dinov2.py``):
  ``draw_masks(global_crops, batch_idx) -> PatchMasks``: which patches of each global crop the student sees masked.
  ``student_tokens(global_crops, mask)``: the student's encoded tokens of the masked global crops.
  ``student_cls_logits(class_tokens)`` / ``student_patch_logits(patch_rows)``: the student heads.
  ``teacher_tokens(global_crops)``: the teacher's encoded tokens of the unmasked global crops (no gradient).
  ``teacher_cls_probabilities(class_tokens, temperature)``: the teacher head and its centering and sharpening of
      the [CLS] outputs (here softmax((g - C) / tau) with the EMA center C, then C updated); (2B, K).
  ``teacher_patch_probabilities(patch_tokens, masks, temperature)``: the same for the patch outputs, returned at
      the masked patches only, (M, K_patch); the patch center is the mean over ALL teacher patch outputs.
  ``extra_losses(student_tokens, masks) -> dict``: more weighted loss terms (none here; DINOv2's KoLeo).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from ssl_lightning.backbones import check_divisible, require_vit
from ssl_lightning.callbacks.momentum import MomentumSchedule, MomentumUpdate
from ssl_lightning.losses.dino import teacher_temperature, update_center_
from ssl_lightning.losses.ibot import cross_view_loss, ibot_patch_loss, masked_patch_weights
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import DINOHead
from ssl_lightning.nn.masking import default_mask_seed, step_generator
from ssl_lightning.nn.masking.blockwise import PatchMasks, block_masks, mask_ratios
from ssl_lightning.optim import clip_grad_norm_per_parameter_


class IBOT(SSLMethod):
    """Args (besides ``SSLMethod``'s; ``backbone`` must be a ViT with a class token: vit_tiny/small/base/large):
        out_dim, patch_out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer: the DINO heads of the
            [CLS] and patch outputs (K = 8192 both in the paper; ``patch_out_dim`` None: ``out_dim``).
        shared_head: one head for [CLS] and patches (the paper's ViT recipes); False: a second DINOHead for the
            patches (DINOv2's choice; the iBOT code's unshared head shares the MLP and only splits the last layer).
        global_crops: the number of global crops, ``batch["views"][:global_crops]`` (2; the data's ``num_views``).
        mask_ratio: the range of the per-image share of masked patches (the paper's pred_ratio 0.3 +- 0.2).
        mask_probability: the share of global crops that are masked at all (0.5: pred_ratio ``0 0.3``).
        mask_aspect_ratio: the range of the blocks' aspect ratio (0.3, 1/0.3).
        mask_start_epoch: no masked patch prediction before this epoch (pred_start_epoch; 0).
        mask_seed: seed of the masks (default: the global seed); each step's mask generator is seeded from
            (seed, rank, step, micro-batch), so ranks differ and a resumed run draws the same masks.
        student_temperature: ``tau_s`` (0.1).
        teacher_temperature, warmup_teacher_temperature: [CLS] ``tau_t``, linear from 0.04 to 0.07 over
            ``warmup_teacher_temperature_epochs`` (30), then constant.
        teacher_patch_temperature, warmup_teacher_patch_temperature: ``tau_t'`` of the patches (0.04 -> 0.07,
            the same warm-up, starting at ``mask_start_epoch``).
        center_momentum, patch_center_momentum: the EMA momentum of the two centers (0.9).
        cls_loss_weight, patch_loss_weight: ``lambda_1`` and ``lambda_2`` (1, 1).
        base_momentum, final_momentum, momentum_schedule: the teacher's EMA (0.996 -> 1, cosine).
        final_weight_decay, freeze_last_layer_epochs, clip_grad: as DINO (0.04 -> 0.4, 1 epoch, 3.0).

    The teacher (backbone and heads) starts as a copy of the student, gets no gradient and no stochastic depth,
    and is updated by ``MomentumUpdate`` (backbone and every head). The learned mask token is a student parameter.
    ``forward`` gives the backbone's pooled feature of full images; a step's ``features`` are those of the first
    (masked) global crop. ``compile_backbone`` compiles only that full-image forward.
    """

    def __init__(
        self,
        backbone: str = "vit_small",
        out_dim: int = 8192,
        patch_out_dim: Optional[int] = None,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        shared_head: bool = True,
        global_crops: int = 2,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        mask_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
        mask_start_epoch: int = 0,
        mask_seed: Optional[int] = None,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        teacher_patch_temperature: float = 0.07,
        warmup_teacher_patch_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 30,
        center_momentum: float = 0.9,
        patch_center_momentum: float = 0.9,
        cls_loss_weight: float = 1.0,
        patch_loss_weight: float = 1.0,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        momentum_schedule: MomentumSchedule = "cosine",
        final_weight_decay: Optional[float] = None,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float = 3.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, **kwargs)
        vit = require_vit(self.backbone, type(self).__name__, backbone)
        if not vit.has_class_token:
            raise ValueError(f"{type(self).__name__} distils the [CLS] token: set backbone_kwargs.class_token=true")
        patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        if shared_head and patch_out_dim != out_dim:
            raise ValueError(f"shared_head=True needs patch_out_dim == out_dim, got {patch_out_dim} and {out_dim}")
        if global_crops < 2:
            raise ValueError(f"global_crops must be >= 2 (the [CLS] loss pairs different global crops), got {global_crops}")
        low, high = mask_ratio
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"mask_ratio must be a range (low, high) with 0 < low <= high < 1, got {tuple(mask_ratio)}")
        if not 0.0 < mask_probability <= 1.0:
            raise ValueError(f"mask_probability must lie in (0, 1], got {mask_probability}")
        if not 0.0 < mask_aspect_ratio[0] <= mask_aspect_ratio[1]:
            raise ValueError(f"mask_aspect_ratio must be a range (low, high) with 0 < low <= high, got {tuple(mask_aspect_ratio)}")
        temperatures = (student_temperature, teacher_temperature, warmup_teacher_temperature,
                        teacher_patch_temperature, warmup_teacher_patch_temperature)
        if min(temperatures) <= 0:
            raise ValueError(f"temperatures must be positive, got {temperatures}")
        for name, value in (("center_momentum", center_momentum), ("patch_center_momentum", patch_center_momentum)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
        if final_weight_decay is not None and self.optim.weight_decay <= 0:
            raise ValueError(f"final_weight_decay={final_weight_decay} needs optim.weight_decay > 0, got {self.optim.weight_decay}")
        self.global_crops = global_crops
        self.mask_ratio, self.mask_probability = (float(low), float(high)), mask_probability
        self.mask_aspect_ratio, self.mask_start_epoch = tuple(mask_aspect_ratio), mask_start_epoch
        self.mask_seed = default_mask_seed(mask_seed)
        self.student_temperature = student_temperature
        self.teacher_temperatures = (warmup_teacher_temperature, teacher_temperature)
        self.teacher_patch_temperatures = (warmup_teacher_patch_temperature, teacher_patch_temperature)
        self.warmup_teacher_temperature_epochs = warmup_teacher_temperature_epochs
        self.center_momentum, self.patch_center_momentum = center_momentum, patch_center_momentum
        self.cls_loss_weight, self.patch_loss_weight = cls_loss_weight, patch_loss_weight
        self.base_momentum, self.final_momentum, self.momentum_schedule = base_momentum, final_momentum, momentum_schedule
        self.final_weight_decay, self.freeze_last_layer_epochs, self.clip_grad = final_weight_decay, freeze_last_layer_epochs, clip_grad

        dim = vit.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(dim))  # the reference's masked_embed, zeros
        self.head = DINOHead(dim, out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer)
        self.patch_head: Optional[DINOHead] = None
        if not shared_head:
            self.patch_head = DINOHead(dim, patch_out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer)
        self.teacher_backbone = self.frozen_copy(self.backbone)  # without stochastic depth
        self.teacher_head = self.frozen_copy(self.head)
        self.teacher_patch_head = None if self.patch_head is None else self.frozen_copy(self.patch_head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, patch_out_dim))

    # --- modules, callbacks, optimizer -----------------------------------------------------------------------

    def heads(self) -> list[nn.Module]:
        """The student heads ([CLS], then the patch head if it is a separate one)."""
        return [self.head] + ([] if self.patch_head is None else [self.patch_head])

    def optimized_modules(self) -> list[nn.Module]:
        """Every trainable parameter of the method: student backbone, heads and mask token (the teachers are frozen)."""
        return [self]

    def configure_callbacks(self) -> list[Callback]:
        pairs = [("backbone", "teacher_backbone"), ("head", "teacher_head")]
        if self.patch_head is not None:
            pairs.append(("patch_head", "teacher_patch_head"))
        return [MomentumUpdate(pairs, self.base_momentum, self.final_momentum, self.momentum_schedule)]

    def setup(self, stage: str) -> None:
        views = getattr(getattr(self.trainer, "datamodule", None), "views", None)
        if views is None:
            return
        if views.num_views != self.global_crops:
            raise ValueError(f"{type(self).__name__} trains on {self.global_crops} global crops: set "
                             f"data.views.num_views={self.global_crops}, got {views.num_views}")
        check_divisible(views.size, self.backbone.patch_size, "data.views.size")
        if views.num_local:
            check_divisible(views.local_size, self.backbone.patch_size, "data.views.local_size")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.schedule_weight_decay(self.final_weight_decay)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.clip_grad > 0:
            clip_grad_norm_per_parameter_([p for p in self.parameters() if p.requires_grad], self.clip_grad)
        if self.current_epoch < self.freeze_last_layer_epochs:
            for head in self.heads():
                for param in head.last_layer.parameters():
                    param.grad = None  # no update at all, not even weight decay

    # --- schedules --------------------------------------------------------------------------------------------

    def current_teacher_temperatures(self) -> tuple[float, float]:
        """``(tau_t, tau_t')`` of the current epoch: [CLS] and patches (the patch warm-up starts with masking)."""
        epochs, epoch = self.warmup_teacher_temperature_epochs, self.current_epoch
        cls = teacher_temperature(epoch, *self.teacher_temperatures, epochs)
        patch = teacher_temperature(max(0, epoch - self.mask_start_epoch), *self.teacher_patch_temperatures, epochs)
        return cls, patch

    # --- the steps of algorithm 1 -----------------------------------------------------------------------------

    def draw_mask_ratios(self, num_images: int, generator: torch.Generator) -> torch.Tensor:
        """Each crop's mask ratio (0: unmasked): ``mask_probability`` of the crops masked at a ratio drawn from
        ``mask_ratio`` (the paper's pred_ratio / pred_ratio_var)."""
        return mask_ratios(num_images, self.mask_ratio, self.mask_probability, generator)

    def draw_masks(self, global_crops: torch.Tensor, batch_idx: int) -> PatchMasks:
        """Blockwise masks of the global crops (``nn.masking.blockwise``), drawn on the CPU from the step's
        generator and moved to the device; none before ``mask_start_epoch``."""
        rows_count, cols_count = self.backbone.grid_size(global_crops)
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        generator = step_generator(torch.device("cpu"), self.mask_seed, self.global_rank, self.trainer.global_step,
                                   micro_batch)
        ratios = self.draw_mask_ratios(global_crops.shape[0], generator)
        if self.current_epoch < self.mask_start_epoch:
            ratios = torch.zeros_like(ratios)
        mask = block_masks(ratios, (rows_count, cols_count), generator, self.mask_aspect_ratio)
        rows = mask.flatten().nonzero().squeeze(1)
        weights = masked_patch_weights(mask).flatten()[rows]
        device = global_crops.device
        return PatchMasks(mask.to(device, non_blocking=True), rows.to(device, non_blocking=True),
                          weights.to(device, non_blocking=True))

    def student_tokens(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The student's encoded tokens of ``images``, the patches under ``mask`` replaced by the mask token."""
        vit = self.backbone
        return vit.encode(vit.embed(images, mask, None if mask is None else self.mask_token))

    def student_cls_logits(self, class_tokens: torch.Tensor) -> torch.Tensor:
        return self.head(class_tokens)

    def student_patch_logits(self, patch_rows: torch.Tensor) -> torch.Tensor:
        """The patch head's outputs of the masked patch tokens (M, D) (the only ones the loss reads)."""
        return (self.head if self.patch_head is None else self.patch_head)(patch_rows)

    @torch.no_grad()
    def teacher_tokens(self, global_crops: torch.Tensor) -> torch.Tensor:
        """The teacher's encoded tokens of the UNMASKED global crops."""
        vit = self.teacher_backbone
        return vit.encode(vit.embed(global_crops))

    @torch.no_grad()
    def teacher_cls_probabilities(self, class_tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        """``P_t = softmax((g_t - C) / tau_t)`` of the teacher's [CLS] outputs (2B, K); then ``C`` moves by its EMA
        towards the global batch's mean output (all-reduced across ranks)."""
        logits = self.teacher_head(class_tokens).float()
        probs = F.softmax((logits - self.center) / temperature, dim=-1)
        update_center_(self.center, logits, self.center_momentum)
        return probs

    @torch.no_grad()
    def teacher_patch_probabilities(self, patch_tokens: torch.Tensor, masks: PatchMasks, temperature: float) -> torch.Tensor:
        """``P_t' = softmax((g_t' - C') / tau_t')`` of the teacher's patch outputs at the masked patches (M, K');
        then ``C'`` moves towards the mean over every teacher patch output of the global batch."""
        head = self.teacher_head if self.teacher_patch_head is None else self.teacher_patch_head
        logits = head(patch_tokens).float().flatten(0, 1)  # (2B * N, K'): the center needs every patch
        probs = F.softmax((logits.index_select(0, masks.rows) - self.patch_center) / temperature, dim=-1)
        update_center_(self.patch_center, logits, self.patch_center_momentum)
        return probs

    def extra_losses(self, student_tokens: torch.Tensor, masks: PatchMasks) -> dict[str, torch.Tensor]:
        """More loss terms, already weighted, by name (logged as ``train/<name>``); none in iBOT."""
        return {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views, crops = batch["views"], self.global_crops
        if len(views) < crops or any(v.shape != views[0].shape for v in views[:crops]):
            raise ValueError(f"{type(self).__name__} needs batch['views'] to start with {crops} global crops of one "
                             f"shape, got shapes {[tuple(v.shape) for v in views]}")
        global_crops, vit = torch.cat(views[:crops]), self.backbone
        masks = self.draw_masks(global_crops, batch_idx)
        # student: masked global crops ([CLS] and masked patches), unmasked local crops ([CLS] only)
        tokens = self.student_tokens(global_crops, masks.mask)
        student_cls = [self.student_cls_logits(vit.class_token(tokens))]
        if len(views) > crops:
            student_cls.append(self.student_cls_logits(vit.class_token(self.student_tokens(torch.cat(views[crops:])))))
        student_cls = list(torch.cat(student_cls).chunk(len(views)))
        student_patch = self.student_patch_logits(vit.patch_tokens(tokens).flatten(0, 1).index_select(0, masks.rows))
        # teacher: unmasked global crops
        teacher = self.teacher_tokens(global_crops)
        cls_temperature, patch_temperature = self.current_teacher_temperatures()
        teacher_cls = self.teacher_cls_probabilities(self.teacher_backbone.class_token(teacher), cls_temperature)
        teacher_patch = self.teacher_patch_probabilities(self.teacher_backbone.patch_tokens(teacher), masks,
                                                         patch_temperature)
        losses = {
            "cls_loss": self.cls_loss_weight * cross_view_loss(student_cls, teacher_cls.chunk(crops), self.student_temperature),
            "patch_loss": self.patch_loss_weight * ibot_patch_loss(student_patch, teacher_patch, masks.weights,
                                                                   self.student_temperature),
            **self.extra_losses(tokens, masks),
        }
        loss = torch.stack(list(losses.values())).sum()
        self.log("train/loss", loss, prog_bar=True)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False)
        entropy = -(teacher_cls * teacher_cls.clamp(min=1e-12).log()).sum(dim=-1).mean()  # log K: uniform collapse
        self.log("train/teacher_entropy", entropy, on_step=True, on_epoch=False)
        self.log("train/masked_share", masks.mask.float().mean(), on_step=True, on_epoch=False)
        self.log("train/teacher_temperature", cls_temperature, on_step=True, on_epoch=False)
        return {"loss": loss, "features": vit.pool(tokens[: views[0].shape[0]]).detach()}
