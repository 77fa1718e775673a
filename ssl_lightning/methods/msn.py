"""MSN (Assran et al. 2022, "Masked Siamese Networks for Label-Efficient Learning") and PMSN (Assran et al. 2023,
"The Hidden Uniform Cluster Prior in Self-Supervised Learning", sec. 5).

A ViT sees an anchor view with a random share of its patches DROPPED (the blocks never see them) and small focal
crops; an EMA target encoder sees another global view unmasked. Both [CLS] outputs go through a projection head
and are assigned softly to learnable prototypes; each anchor predicts the target's sharpened assignment
(cross-entropy), and the mean anchor assignment over the global batch is pulled to a prior: uniform (MSN's
mean-entropy maximisation) or a power law (PMSN).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ssl_lightning.backbones import check_divisible, require_vit
from ssl_lightning.callbacks.momentum import MomentumSchedule, MomentumUpdate
from ssl_lightning.losses.msn import msn_loss, power_law_prior
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn.masking import default_mask_seed, kept_indices, masked_count, random_mask, step_generator


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MSN's 3-layer projector on the [CLS] output: linear, BatchNorm, GELU, linear, BatchNorm, GELU, linear
    (the reference code's ``fc`` with ``use_bn``; 2048 hidden, 256 out)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, out_dim),
    )


class MSN(SSLMethod):
    """Args (besides ``SSLMethod``'s; ``backbone`` must be a ViT: ``vit_tiny/small/base/large``):
        mask_ratio: share of the anchor view's patches dropped (0.15 for ViT-S/16, 0.3 ViT-B/16, 0.7 ViT-L/7).
        focal_views: the focal (local) crops per image, ``data.views.num_local`` (10 in the paper; 0: none).
        projection_hidden_dim, projection_dim: the projector (2048, 256).
        num_prototypes: K (1024); the prototypes are a (K, projection_dim) parameter, L2-normalised where they
            are used (cosine similarity), without weight decay (the reference code).
        temperature: ``tau`` of the anchors' softmax (0.1).
        target_temperature, sharpen_temperature: the targets' softmax temperature and the sharpening ``T``
            (0.1 and 0.25 as the reference code: the paper's ``tau+ = 0.025``). Setting 0.025 here AND
            sharpening would sharpen twice.
        regularization_weight: ``lambda`` of the prior term (1).
        prior: ``"uniform"`` (MSN's me-max) or ``"power_law"`` (PMSN: ``p_k ~ k ** -power_law_exponent``).
        power_law_exponent: PMSN's ``tau`` (0.25).
        sinkhorn_iterations: Sinkhorn-Knopp steps on the targets over the global batch (3, the reference code's
            ``use_sinkhorn``; 0: none).
        base_momentum, final_momentum, momentum_schedule: the target encoder's EMA (0.996 -> 1, cosine over the
            optimizer steps by default; ``linear`` is the reference code's).
        final_weight_decay: the weight decay at the end of a cosine schedule from ``optim.weight_decay``
            (0.04 -> 0.4); ``None`` keeps it constant.
        mask_seed: seed of the masks (default: the global seed); each step's masks are drawn from a generator
            seeded from (seed, rank, step, micro-batch), as MAE's.

    Views (``batch["views"]``): ``views[0]`` is the target view; the other global views (or ``views[0]`` itself
    when it is the only one) are the masked anchors; the local views are the focal anchors (not masked, as the
    reference code). ``forward`` (evaluation) is the student backbone on the whole image ([CLS]); the ``features`` a
    training step returns for the online probe are those of the first masked anchor, as MAE's. Global and focal
    views are told apart by size (the leading views of ``views[0]``'s shape are the global ones).
    """

    def __init__(
        self,
        backbone: str = "vit_small",
        mask_ratio: float = 0.15,
        focal_views: int = 10,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 256,
        num_prototypes: int = 1024,
        temperature: float = 0.1,
        target_temperature: float = 0.1,
        sharpen_temperature: float = 0.25,
        regularization_weight: float = 1.0,
        prior: Literal["uniform", "power_law"] = "uniform",
        power_law_exponent: float = 0.25,
        sinkhorn_iterations: int = 3,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        momentum_schedule: MomentumSchedule = "cosine",
        final_weight_decay: Optional[float] = None,
        mask_seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, **kwargs)
        require_vit(self.backbone, "MSN", backbone)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        if focal_views < 0 or num_prototypes < 1 or sinkhorn_iterations < 0:
            raise ValueError(f"focal_views and sinkhorn_iterations must be >= 0 and num_prototypes >= 1, got "
                             f"{focal_views}, {sinkhorn_iterations}, {num_prototypes}")
        if min(temperature, target_temperature, sharpen_temperature) <= 0:
            raise ValueError(f"temperatures must be positive, got temperature={temperature}, "
                             f"target_temperature={target_temperature}, sharpen_temperature={sharpen_temperature}")
        if prior not in ("uniform", "power_law"):
            raise ValueError(f"prior must be 'uniform' or 'power_law', got {prior!r}")
        if final_weight_decay is not None and self.optim.weight_decay <= 0:
            raise ValueError(f"final_weight_decay={final_weight_decay} needs optim.weight_decay > 0, got "
                             f"{self.optim.weight_decay}")
        self.mask_ratio, self.focal_views = mask_ratio, focal_views
        self.temperature, self.target_temperature, self.sharpen_temperature = (
            temperature, target_temperature, sharpen_temperature)
        self.regularization_weight, self.sinkhorn_iterations = regularization_weight, sinkhorn_iterations
        self.base_momentum, self.final_momentum, self.momentum_schedule = base_momentum, final_momentum, momentum_schedule
        self.final_weight_decay = final_weight_decay
        self.mask_seed = default_mask_seed(mask_seed)
        self.head = projection_head(self.backbone.feature_dim, projection_hidden_dim, projection_dim)
        bound = projection_dim**-0.5  # the reference code's uniform initialisation
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, projection_dim).uniform_(-bound, bound))
        prior_probabilities = power_law_prior(num_prototypes, power_law_exponent) if prior == "power_law" else None
        self.prior: Optional[torch.Tensor]
        self.register_buffer("prior", prior_probabilities, persistent=False)
        self.target_backbone = self.frozen_copy(self.backbone)
        self.target_head = self.frozen_copy(self.head)

    def configure_callbacks(self) -> list[Callback]:
        pairs = [("backbone", "target_backbone"), ("head", "target_head")]
        return [MomentumUpdate(pairs, self.base_momentum, self.final_momentum, self.momentum_schedule)]

    def configure_optimizers(self) -> dict[str, Any]:
        config = super().configure_optimizers()
        groups = config["optimizer"].param_groups
        for group in groups:  # the prototypes join the bias/norm group: no weight decay (the reference code)
            group["params"] = [p for p in group["params"] if p is not self.prototypes]
        next(g for g in groups if g["lars_exclude"] and not g["fixed_lr"])["params"].append(self.prototypes)
        return config

    def setup(self, stage: str) -> None:
        recipe = getattr(getattr(self.trainer, "datamodule", None), "views", None)
        if recipe is None:
            return
        self.check_view_counts(recipe.num_views, recipe.num_local)
        check_divisible(recipe.size, self.backbone.patch_size, "data.init_args.views.size")
        if recipe.num_local:
            check_divisible(recipe.local_size, self.backbone.patch_size, "data.init_args.views.local_size")

    def check_view_counts(self, num_global: int, num_local: int) -> None:
        if num_global < 1:
            raise ValueError(f"MSN needs at least 1 global view (the target), got data.init_args.views.num_views={num_global}")
        if num_local != self.focal_views:
            raise ValueError(f"MSN was built for focal_views={self.focal_views} focal crops per image, the data makes "
                             f"data.init_args.views.num_local={num_local}")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.schedule_weight_decay(self.final_weight_decay)

    def masked_anchor(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's pooled feature (B, D) of ``images`` with ``mask_ratio`` of each image's patches dropped
        before the blocks, and the mask (B, N), True on dropped patches."""
        tokens = self.backbone.embed(self.to_memory_format(images))
        num_patches = tokens.shape[1] - self.backbone.num_prefix_tokens
        mask = random_mask(images.shape[0], num_patches, self.mask_ratio, generator, images.device)
        kept = kept_indices(mask, num_patches - masked_count(num_patches, self.mask_ratio))
        return self.backbone.pool(self.backbone.encode(self.backbone.keep_patches(tokens, kept))), mask

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The EMA target encoder's projection (B, projection_dim) of the unmasked target view (no gradient)."""
        return self.target_head(self.target_backbone(self.to_memory_format(images)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        num_global = next((i for i, view in enumerate(views) if view.shape != views[0].shape), len(views))
        self.check_view_counts(num_global, len(views) - num_global)
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        generator = step_generator(views[0].device, self.mask_seed, self.global_rank, self.trainer.global_step, micro_batch)
        masked_views = views[1:num_global] or views[:1]
        features, _ = self.masked_anchor(torch.cat(masked_views), generator)
        anchors = [self.head(features)]  # one BatchNorm batch per resolution, as the reference code
        if len(views) > num_global:
            anchors.append(self.head(self.backbone(self.to_memory_format(torch.cat(views[num_global:])))))
        anchors_by_view = torch.cat(anchors).unflatten(0, (-1, views[0].shape[0]))  # (V, B, D)
        terms = msn_loss(anchors_by_view, self.target(views[0]), self.prototypes, self.temperature,
                         self.target_temperature, self.sharpen_temperature, self.regularization_weight, self.prior,
                         self.sinkhorn_iterations)
        self.log("train/loss", terms.loss, prog_bar=True)
        self.log("train/cross_entropy", terms.cross_entropy)
        self.log("train/regularizer", terms.regularizer)
        batch_size = views[0].shape[0]
        return {"loss": terms.loss, "features": features[:batch_size].detach(), "embeddings": anchors_by_view[0].detach()}

