"""Fine-tuning of a pretrained backbone with a linear head on labeled images.

The semi-supervised protocol of SimCLR (Chen et al. 2020, section 4.2 and appendix B.5): the whole network
is trained on a (small) labeled subset with random resized crops and flips only, SGD with momentum, no
warm-up, no weight decay, lr 0.05 x batch / 256. For ViTs, MAE's end-to-end fine-tuning (He et al. 2022,
appendix A.3) adds layer-wise learning-rate decay (Bao et al. 2022, BEiT; Clark et al. 2020, ELECTRA):
block ``i`` of ``depth`` trains at ``lr * layer_decay ** (depth - i)``, the patch embedding at
``lr * layer_decay ** (depth + 1)``, the final norm and the head at ``lr``.

The classifier is a plain LightningModule trained by a Lightning ``Trainer`` (any accelerator, DDP,
precision); validation accuracy is computed once after training over every validation image exactly once,
also under DDP (each rank scores a shard and the scores are gathered).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.plugins import Precision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.functional.classification import multiclass_accuracy

from ssl_lightning.backbones import TimmViT
from ssl_lightning.callbacks import LogFriendlyProgressBar
from ssl_lightning.datamodules.base import SSLDataModule, TransformedImages
from ssl_lightning.distributed import gather_variable_length, rank, world_size
from ssl_lightning.methods.training_log import TrainingLog
from ssl_lightning.optim import (
    OptimConfig,
    layer_decay_groups,
    optimizer_for_groups,
    param_groups,
    scaled_lr,
    warmup_cosine,
    warmup_cosine_steps,
)
from ssl_lightning.transforms import SimCLRViews

# ViT parameters that take no weight decay besides biases and norms (timm's and MAE's ``no_weight_decay``)
_VIT_NO_WEIGHT_DECAY = frozenset({"cls_token", "reg_token", "dist_token", "pos_embed"})


@dataclass
class FineTuneConfig:
    """How the whole network is fine-tuned (defaults: SimCLR's semi-supervised recipe).

    ``lr`` is the rate for a global batch of 256 images, scaled linearly with the global batch size;
    ``batch_size`` is per process. ``layer_decay`` (ViT backbones only) enables layer-wise lr decay, e.g.
    0.65-0.75 as in MAE. ``crop_scale`` is the area range of the random resized crop.
    """

    epochs: int = 30
    batch_size: int = 256
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.05
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    layer_decay: Optional[float] = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_epochs >= 0; got {self.lr}, "
                             f"{self.weight_decay}, {self.warmup_epochs}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must lie in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        self.crop_scale = tuple(float(s) for s in self.crop_scale)  # type: ignore[assignment]

    def optim(self) -> OptimConfig:
        return OptimConfig(
            name=self.optimizer, lr=self.lr, scale_lr="linear", weight_decay=self.weight_decay,
            momentum=self.momentum, warmup_epochs=self.warmup_epochs,
        )


def vit_of(backbone: nn.Module) -> nn.Module:
    """The ViT inside ``backbone`` (the timm model of ``TimmViT``, or MAE's ``MaskedViTEncoder`` itself),
    whose parameters are named ``cls_token``, ``patch_embed.*``, ``blocks.<i>.*``, ``norm.*``."""
    from ssl_lightning.nn.vit_mae import MaskedViTEncoder

    if isinstance(backbone, TimmViT):
        return backbone.model
    if isinstance(backbone, MaskedViTEncoder):
        return backbone
    raise ValueError(
        f"layer_decay needs a ViT backbone (vit_* or mae_vit_*), got {type(backbone).__name__}; "
        "leave layer_decay unset for other backbones"
    )


class FineTuneClassifier(TrainingLog):
    """``head(backbone(images))`` trained end to end with cross-entropy (its loss shown in the progress bar
    without a host read per step: see ``TrainingLog``).

    The head starts at zero (MAE uses a near-zero init: early gradients then do not disturb the pretrained
    features) or, with ``head_init``, as a copy of that linear layer (e.g. the linear probe's head, which
    maps raw backbone features to logits). The backbone is trained in place: pass a copy to keep the original.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        config: Optional[FineTuneConfig] = None,
        head_init: Optional[nn.Linear] = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else FineTuneConfig()
        self.backbone = backbone.requires_grad_(True)
        feature_dim = int(backbone.feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        if head_init is None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            expected = (num_classes, feature_dim)
            if tuple(head_init.weight.shape) != expected or head_init.bias is None:
                raise ValueError(f"head_init must be an nn.Linear with bias and weight of shape {expected} "
                                 f"(num_classes, feature_dim), got weight {tuple(head_init.weight.shape)}")
            with torch.no_grad():
                self.head.weight.copy_(head_init.weight)
                self.head.bias.copy_(head_init.bias)
        if self.config.layer_decay is not None:
            vit_of(backbone)  # fail now, not after the data is loaded

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["image"]), batch["label"], label_smoothing=self.config.label_smoothing)
        self.log("finetune/train_loss", loss, prog_bar=True)
        return loss

    def parameter_groups(self) -> list[dict]:
        """Groups with an ``lr_scale``: layer-wise for ViTs with ``layer_decay``, else 1 (no weight decay on
        biases and norms)."""
        if self.config.layer_decay is not None:  # the head in the top layer; ViT tokens and positions undecayed
            return layer_decay_groups([self.backbone, self.head], self.config.weight_decay, self.config.layer_decay,
                                      1.0, _VIT_NO_WEIGHT_DECAY)
        groups = param_groups([self.backbone, self.head], self.config.weight_decay)
        return [{**group, "lr_scale": 1.0} for group in groups if group["params"]]

    def make_optimizer(self, global_batch_size: int) -> torch.optim.Optimizer:
        """The configured optimizer, each group at ``lr * batch / 256 * lr_scale``."""
        lr = scaled_lr(self.config.lr, global_batch_size, "linear")
        groups = [{**group, "lr": lr * group["lr_scale"]} for group in self.parameter_groups()]
        return optimizer_for_groups(self.config.optim(), groups, lr)

    def configure_optimizers(self) -> dict[str, Any]:
        global_batch = self.config.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        optimizer = self.make_optimizer(global_batch)
        warmup_steps, total_steps = warmup_cosine_steps(self.trainer, self.config.warmup_epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass
class FineTuneResult:
    """Top-1 / top-5 accuracy (percent) on the validation split after fine-tuning on ``num_train`` images."""

    top1: float
    top5: float
    num_train: int
    model: FineTuneClassifier
    trainer: Trainer


@torch.no_grad()
def predict_probabilities(
    model: FineTuneClassifier,
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    precision: Optional[Precision] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities ``(N, C)`` float32 and labels ``(N,)`` of every item ``{"image", "label"}`` of
    ``dataset``, on the CPU in dataset order. ``model`` is left in eval mode on ``device``.

    Under DDP rank ``r`` scores items ``r, r + W, ...`` and the rows are gathered: every item counts once
    (a ``DistributedSampler`` would pad with duplicates). ``precision`` (a Lightning precision plugin) gives
    the autocast context and input conversion used in training.
    """
    rank_, world = rank(), world_size()
    loader = DataLoader(Subset(dataset, range(rank_, len(dataset), world)), batch_size=batch_size,  # type: ignore[arg-type]
                        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
    model.to(device).eval()
    probabilities, labels = [], []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with precision.forward_context() if precision is not None else nullcontext():
            logits = model(precision.convert_input(images) if precision is not None else images)
        probabilities.append(logits.float().softmax(dim=1))
        labels.append(batch["label"].to(device).long())
    local = torch.cat(probabilities) if probabilities else torch.empty(0, model.head.out_features, device=device)
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)
    gathered, gathered_labels = gather_variable_length(local), gather_variable_length(local_labels)
    order = torch.cat([torch.arange(r, len(dataset), world) for r in range(world)])  # type: ignore[arg-type]
    out, out_labels = torch.empty_like(gathered).cpu(), torch.empty_like(gathered_labels).cpu()
    out[order], out_labels[order] = gathered.cpu(), gathered_labels.cpu()
    return out, out_labels


def crop_flip_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], scale: tuple[float, float]) -> Any:
    """Fine-tuning augmentation of one uint8 CHW image: random resized crop and horizontal flip only."""
    recipe = SimCLRViews(size=size, num_views=1, scale=scale, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                         mean=mean, std=std)
    return recipe.per_sample()


def fit_classifier(
    backbone: nn.Module,
    train: Dataset,
    datamodule: SSLDataModule,
    config: Optional[FineTuneConfig] = None,
    head_init: Optional[nn.Linear] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
) -> FineTuneResult:
    """Fine-tune a copy of ``backbone`` (the original is left untouched) with a linear head on ``train``
    (items ``(uint8 CHW image, label)``) and measure top-1/top-5 on the datamodule's validation images.

    ``trainer_kwargs`` go to the Lightning ``Trainer`` (``accelerator``, ``devices``, ``strategy``,
    ``precision``, ``logger``, ...); the number of epochs comes from ``config``.
    """
    config = config if config is not None else FineTuneConfig()
    num_classes = datamodule.num_classes
    val = datamodule.val_dataset()
    if num_classes is None or val is None:
        raise ValueError(f"{type(datamodule).__name__} has no labels: fine-tuning needs labeled training and validation images")
    if len(train) == 0:  # type: ignore[arg-type]
        raise ValueError("fine-tuning needs at least one labeled training image")
    kwargs = dict(trainer_kwargs or {})
    if "max_epochs" in kwargs or "max_steps" in kwargs:
        raise ValueError("set the length of fine-tuning with FineTuneConfig.epochs, not trainer_kwargs")
    defaults = dict(logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer = Trainer(**{**defaults, **kwargs, "max_epochs": config.epochs, "callbacks": with_progress_bar(kwargs)})
    model = FineTuneClassifier(copy.deepcopy(backbone), num_classes, config, head_init)
    transform = crop_flip_transform(datamodule.image_size, datamodule.mean, datamodule.std, config.crop_scale)
    per_process = len(train) // trainer.world_size  # type: ignore[arg-type]
    loader = DataLoader(
        TransformedImages(train, transform), batch_size=config.batch_size, shuffle=True,
        drop_last=per_process >= config.batch_size,  # a last batch of 1 breaks BatchNorm; a small set keeps it
        num_workers=datamodule.num_workers, persistent_workers=datamodule.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    trainer.fit(model, loader)
    scores, labels = predict_probabilities(model, val, datamodule.eval_batch_size, datamodule.num_workers,
                                           trainer.strategy.root_device, trainer.precision_plugin)
    top1, top5 = (
        100.0 * float(multiclass_accuracy(scores, labels, num_classes, top_k=min(k, num_classes), average="micro"))
        for k in (1, 5)
    )
    return FineTuneResult(top1=top1, top5=top5, num_train=len(train), model=model, trainer=trainer)  # type: ignore[arg-type]


def with_progress_bar(trainer_kwargs: dict[str, Any]) -> list[Any]:
    """The callbacks in ``trainer_kwargs`` plus a ``LogFriendlyProgressBar`` when the bar is on and none is given
    (it shows the loss that ``FineTuneClassifier`` keeps out of Lightning's per-step bar), redrawn as in
    ``configs/base.yaml``."""
    given = trainer_kwargs.get("callbacks") or []
    callbacks = [given] if isinstance(given, Callback) else list(given)
    if trainer_kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(LogFriendlyProgressBar(refresh_rate=50))
    return callbacks


def finetune(
    backbone: nn.Module,
    datamodule: SSLDataModule,
    indices: Optional[torch.Tensor | list[int]] = None,
    config: Optional[FineTuneConfig] = None,
    head_init: Optional[nn.Linear] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
) -> FineTuneResult:
    """Fine-tune on the datamodule's labeled training images (only ``indices`` of them, e.g. a label
    fraction from ``label_fraction_indices``) and evaluate on its validation images."""
    train, _ = datamodule.labeled_sources()
    if train is None:
        raise ValueError(f"{type(datamodule).__name__} has no labeled training images to fine-tune on")
    subset = train if indices is None else Subset(train, torch.as_tensor(indices).tolist())
    return fit_classifier(backbone, subset, datamodule, config, head_init, trainer_kwargs)
