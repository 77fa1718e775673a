"""``SSLMethod``: what every self-supervised method shares (backbone, optimizer recipe, logging)."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.methods.training_log import TrainingLog
from ssl_lightning.nn.memory_format import to_channels_last
from ssl_lightning.optim import (
    OptimConfig,
    build_optimizer,
    constant_lr,
    cosine_schedule,
    fused_allowed,
    total_optimizer_steps,
    warmup_cosine,
    warmup_cosine_steps,
)
from ssl_lightning.sharding import apply_activation_checkpointing, data_parallel_mesh, shard, transformer_blocks


class SSLMethod(TrainingLog):
    """Base class of the methods. A subclass builds its heads and implements ``training_step``.

    Args:
        backbone: a name from ``ssl_lightning.backbones.BACKBONES``.
        backbone_kwargs: keyword arguments of that backbone (e.g. ``base_width``, ``image_size``).
        optim: the optimizer recipe (LARS/SGD/AdamW, base lr per 256 images, warm-up then cosine).
        channels_last: run the backbone in channels-last memory format; None (default): on for convolutional
            backbones (ResNets, ConvNeXts: faster on CPUs and tensor cores), off for ViTs; narrow 1x1 strided
            convolutions subsample, then run at stride 1 on the CPU (``ssl_lightning.nn.memory_format``: a oneDNN bug).
        compile_backbone: ``torch.compile`` the backbone (keeps state-dict keys).
        compile_step: ``torch.compile`` the whole ``training_step``: backbone, heads, targets and loss in one graph,
            and their backward; Lightning's logging stays outside it (a graph break). Keeps state-dict keys; not
            with ``compile_backbone`` (it already compiles the backbone) or FSDP2 sharding.
        activation_checkpointing: recompute each transformer block's activations in the backward instead of
            keeping them (``ssl_lightning.sharding``; ViTs; with or without sharding).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        optim: Optional[OptimConfig] = None,
        channels_last: Optional[bool] = None,
        compile_backbone: bool = False,
        activation_checkpointing: bool = False,
        compile_step: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, **(backbone_kwargs or {}))
        self.optim = optim if optim is not None else OptimConfig()
        self.channels_last = _is_convolutional(self.backbone) if channels_last is None else channels_last
        if self.channels_last:
            self.backbone = to_channels_last(self.backbone)
        if compile_backbone and compile_step:
            raise ValueError("compile_step: true already compiles the backbone with the rest of the step; "
                             "set compile_backbone: false")
        if compile_backbone:
            self.backbone.compile()
        if compile_step:  # the subclass's step, compiled at its first call (after the subclass built its heads)
            self.training_step = torch.compile(self.training_step)  # type: ignore[method-assign]
        if activation_checkpointing and not transformer_blocks(self.backbone):
            raise ValueError(f"activation_checkpointing=True needs a ViT backbone (transformer blocks), got {backbone!r}")
        self.activation_checkpointing = activation_checkpointing

    def configure_model(self) -> None:
        """Lightning's hook, called once the processes are up: activation checkpointing of every transformer
        block when ``activation_checkpointing``, then, under ``ModelParallelStrategy`` (``self.device_mesh``
        set), FSDP2 sharding of the blocks of every submodule (student, EMA teacher, decoder, predictor) and of
        the method as the root (``ssl_lightning.sharding``)."""
        if self.activation_checkpointing:
            apply_activation_checkpointing(self)
        if self.device_mesh is not None:
            if self.hparams.get("compile_step"):
                raise ValueError("compile_step: true does not run under FSDP2 sharding (ModelParallelStrategy); "
                                 "use compile_backbone: true or set compile_step: false")
            shard(self, data_parallel_mesh(self.device_mesh))

    def on_fit_start(self) -> None:
        """Refuse weights stored in bfloat16 / float16 (Lightning's ``bf16-true`` / ``16-true``) in one line: an
        EMA step at momentum 0.996, or a small learning-rate step, is mostly below their resolution and lost (100
        EMA steps leave most bfloat16 target weights unchanged), and the views are made in float32."""
        narrow = {p.dtype for p in self.parameters()} & {torch.bfloat16, torch.float16}
        if narrow:
            dtype = narrow.pop()
            raise ValueError(
                f"{type(self).__name__}: weights stored in {dtype} (precision bf16-true or 16-true); the methods "
                f"train float32 weights: updates below {dtype}'s resolution ({torch.finfo(dtype).eps:g}), such as "
                f"an EMA step at momentum 0.996, would be lost; use precision bf16-mixed or 16-mixed"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``images``: what downstream evaluation uses."""
        return self.backbone(self.to_memory_format(images))

    def require_views(self, num_views: int) -> None:
        """In ``setup``: one line naming the setting unless the data makes ``num_views`` global views and no local
        ones (a method of K views of one size: FastSiam, W-MSE). No-op without a datamodule that has ``views``."""
        views = getattr(getattr(self.trainer, "datamodule", None), "views", None)
        if views is not None and (views.num_views != num_views or views.num_local):
            raise ValueError(f"{type(self).__name__} trains on num_views={num_views} views per image: set "
                             f"data.init_args.views.num_views: {num_views} and num_local: 0, got "
                             f"{views.num_views} and {views.num_local}")

    def require_feature_map(self) -> None:
        """When built: one line unless the backbone has a spatial feature map (methods on feature-map cells)."""
        if not hasattr(self.backbone, "feature_map"):
            raise ValueError(f"{type(self).__name__} needs a backbone with a spatial feature map (feature_map), e.g. "
                             f"resnet50, cifar_resnet18 or convnext_tiny; got {type(self.backbone).__name__}")

    def two_views(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of a two-view method's batch; a clear error for any other recipe (e.g. multi-crop)."""
        views = batch["views"]
        if len(views) != 2:
            raise ValueError(
                f"{type(self).__name__} trains on two views per image; set data.init_args.views.num_views: 2 "
                f"and num_local: 0 (got {len(views)} views)"
            )
        return views[0], views[1]

    def features_by_resolution(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features of every view, one backbone call per run of consecutive same-size views.

        Multi-crop (Caron et al. 2020): the global crops go through the backbone as one batch and the
        local crops as another, instead of one call per crop. Returns one (B, D) tensor per view, in order.
        """
        features: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features += list(self(torch.cat(views[start:end])).chunk(end - start))
            start = end
        return features

    def to_memory_format(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in the backbone's memory format (channels-last when ``channels_last``)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def frozen_copy(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` with the same weights and no gradient: a target network updated by EMA.

        The copy has no stochastic depth (timm's ``DropPath``): the teachers of DINO, iBOT, DINOv2, MSN and
        I-JEPA's target encoder run the whole network, as their reference code."""
        target = copy.deepcopy(module).requires_grad_(False)
        for submodule in target.modules():
            if hasattr(submodule, "drop_prob"):
                submodule.drop_prob = 0.0
        if module is self.backbone and self.hparams.get("compile_backbone"):
            target.compile()  # deepcopy drops the compiled forward
        return target

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"features": self(batch["image"]).detach()}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Features and labels of an evaluation batch (``ssl-lightning predict`` extracts features)."""
        return {"features": self(batch["image"]), "label": batch["label"]}

    def optimized_modules(self) -> list[nn.Module]:
        """The modules the optimizer trains (targets updated by EMA are left out by subclasses)."""
        return [self]

    def fixed_lr_modules(self) -> list[nn.Module]:
        """Modules trained at the constant scaled learning rate, without warm-up or decay (SimSiam's
        predictor); a subclass that returns some leaves them out of ``optimized_modules``."""
        return []

    def global_batch_size(self) -> int:
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("the learning-rate scaling needs the datamodule's batch_size")
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(
            self.optim, self.optimized_modules(), self.global_batch_size(), self.fixed_lr_modules(),
            fused_allowed(self.trainer),
        )
        warmup_steps, total_steps = warmup_cosine_steps(self.trainer, self.optim.warmup_epochs)
        factor = warmup_cosine(warmup_steps, total_steps, self.optim.min_lr_ratio)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [constant_lr if group.get("fixed_lr") else factor for group in optimizer.param_groups]
        )
        for group in optimizer.param_groups:  # a weight-decay schedule leaves the bias/norm groups at 0
            group["scheduled_weight_decay"] = group["weight_decay"] > 0
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def schedule_weight_decay(self, final_weight_decay: Optional[float]) -> None:
        """Set this step's weight decay: cosine from ``optim.weight_decay`` to ``final_weight_decay`` over the
        optimizer steps of the run (DINO, iBOT, I-JEPA, MSN: 0.04 -> 0.4 for ViTs), on the groups that have
        weight decay; ``None`` leaves it constant. Call it from ``on_train_batch_start``; logs ``train/weight_decay``."""
        if final_weight_decay is None:
            return
        total = total_optimizer_steps(self.trainer)
        weight_decay = cosine_schedule(self.trainer.global_step, total, self.optim.weight_decay, final_weight_decay)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                if group.get("scheduled_weight_decay"):
                    group["weight_decay"] = weight_decay
        self.log("train/weight_decay", weight_decay, on_step=True, on_epoch=False)


def _is_convolutional(backbone: nn.Module) -> bool:
    """A backbone of convolutions (a ViT's patch embedding alone does not make one)."""
    return not transformer_blocks(backbone) and any(isinstance(m, nn.Conv2d) for m in backbone.modules())
