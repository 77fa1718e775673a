"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): self-distillation
with no labels. A student matches, on every crop, the centered and sharpened output of a momentum teacher
that sees only the global crops (algorithm 1). Works with ResNet and ViT backbones."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ssl_lightning.callbacks.momentum import MomentumSchedule, MomentumUpdate
from ssl_lightning.losses import dino_loss, teacher_entropy, teacher_temperature, update_center_
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import DINOHead
from ssl_lightning.optim import clip_grad_norm_per_parameter_

NUM_GLOBAL_CROPS = 2  # batch["views"][:2] are the global crops, the rest local crops (multi-crop)


class DINO(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer, use_bn_in_head: the DINO head
            (K = 65536 outputs, 3 layers 2048 -> 256, weight-normalized last layer with its norm fixed at 1, no
            BatchNorm: the ViT setting).
        student_temperature: ``tau_s`` (0.1).
        teacher_temperature, warmup_teacher_temperature, warmup_teacher_temperature_epochs: ``tau_t``, linear
            from 0.04 to 0.07 over the first 30 epochs, then constant.
        center_momentum: ``m`` of the center's EMA (0.9).
        base_momentum, final_momentum, momentum_schedule: the teacher's EMA ``lambda``, cosine from 0.996 to 1
            over the optimizer steps.
        final_weight_decay: the weight decay at the end of a cosine schedule from ``optim.weight_decay``
            (0.04 -> 0.4 for ViTs) over the optimizer steps; ``None`` keeps it constant. Bias and norm
            parameters keep no weight decay.
        freeze_last_layer_epochs: epochs during which the head's last layer gets no update (1).
        clip_grad: clip each parameter's gradient norm to this value (3.0; 0 disables), as the reference code.

    The teacher (backbone and head) starts as a copy of the student and receives no gradient; it runs on
    ``batch["views"][:2]`` (the two global crops) and the student on every crop. Stochastic depth stays in the
    student only. ``MomentumUpdate`` comes with the method (``configure_callbacks``).
    """

    def __init__(
        self,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 30,
        center_momentum: float = 0.9,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        momentum_schedule: MomentumSchedule = "cosine",
        final_weight_decay: Optional[float] = None,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float = 3.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if min(student_temperature, teacher_temperature, warmup_teacher_temperature) <= 0:
            raise ValueError(
                f"temperatures must be positive, got student_temperature={student_temperature}, "
                f"teacher_temperature={teacher_temperature}, warmup_teacher_temperature={warmup_teacher_temperature}"
            )
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1), got {center_momentum}")
        if final_weight_decay is not None and self.optim.weight_decay <= 0:
            raise ValueError(
                f"final_weight_decay={final_weight_decay} needs optim.weight_decay > 0 (the start of the schedule "
                f"and the mark of the decayed parameter groups), got {self.optim.weight_decay}"
            )
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.warmup_teacher_temperature_epochs = warmup_teacher_temperature_epochs
        self.center_momentum = center_momentum
        self.base_momentum, self.final_momentum, self.momentum_schedule = base_momentum, final_momentum, momentum_schedule
        self.final_weight_decay = final_weight_decay
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.clip_grad = clip_grad
        self.head = DINOHead(
            self.backbone.feature_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer, use_bn_in_head
        )
        self.teacher_backbone = self.frozen_copy(self.backbone)  # without stochastic depth
        self.teacher_head = self.frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def optimized_modules(self) -> list[nn.Module]:
        return [self.backbone, self.head]

    def configure_callbacks(self) -> list[Callback]:
        pairs = [("backbone", "teacher_backbone"), ("head", "teacher_head")]
        return [MomentumUpdate(pairs, self.base_momentum, self.final_momentum, self.momentum_schedule)]

    def current_teacher_temperature(self) -> float:
        """``tau_t`` of the current epoch."""
        return teacher_temperature(
            self.current_epoch,
            self.warmup_teacher_temperature,
            self.teacher_temperature,
            self.warmup_teacher_temperature_epochs,
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.schedule_weight_decay(self.final_weight_decay)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.clip_grad > 0:
            clip_grad_norm_per_parameter_([p for m in self.optimized_modules() for p in m.parameters()], self.clip_grad)
        if self.current_epoch < self.freeze_last_layer_epochs:
            for param in self.head.last_layer.parameters():
                param.grad = None  # no update at all, not even weight decay

    @torch.no_grad()
    def teacher(self, global_crops: torch.Tensor) -> torch.Tensor:
        """The teacher's head outputs ``g_t`` of the global crops (no gradient)."""
        return self.teacher_head(self.teacher_backbone(self.to_memory_format(global_crops)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        if len(views) < NUM_GLOBAL_CROPS or views[0].shape != views[1].shape:
            raise ValueError(
                f"DINO needs batch['views'] to start with {NUM_GLOBAL_CROPS} global crops of one shape, "
                f"got shapes {[tuple(v.shape) for v in views]}"
            )
        features = self.features_by_resolution(views)
        student = self.head(torch.cat(features)).chunk(len(views))
        teacher = self.teacher(torch.cat(views[:NUM_GLOBAL_CROPS]))
        temperature = self.current_teacher_temperature()
        loss = dino_loss(student, teacher.chunk(NUM_GLOBAL_CROPS), self.center, self.student_temperature, temperature)
        entropy = teacher_entropy(teacher, self.center, temperature)  # log K: uniform collapse; 0: one-hot
        update_center_(self.center, teacher, self.center_momentum)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/teacher_entropy", entropy, on_step=True, on_epoch=False)
        self.log("train/teacher_temperature", temperature, on_step=True, on_epoch=False)
        return {"loss": loss, "features": features[0].detach()}
