"""LeJEPA (Balestriero and LeCun 2025, "LeJEPA: Provable and Scalable Self-Supervised Learning Without the
Heuristics"): one network embeds every view (2 global + local crops, DINO's multi-crop); each view predicts the
mean embedding of its image's global views, and SIGReg pushes each view's embeddings towards an isotropic
Gaussian by testing random one-dimensional projections with the Epps-Pulley statistic (Algorithms 1-2). No
teacher, no EMA, no stop-gradient, no predictor network: one trade-off ``lambda``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ssl_lightning.losses.sigreg import epps_pulley_knots, lejepa_loss, slice_directions
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead
from ssl_lightning.nn.masking import default_mask_seed, step_generator


class LeJEPA(SSLMethod):
    """Args (besides ``SSLMethod``'s; any backbone, ResNet or ViT):
        projection_hidden_dim, projection_dim, projection_layers: the projector whose outputs the loss sees
            (linear layers with BatchNorm and ReLU between them, none after the last; the official example's
            2048-2048-K MLP).
        sigreg_weight: ``lambda`` in ``(1 - lambda) * prediction + lambda * SIGReg`` (0.05, the paper's default).
        num_slices: random directions ``|A|`` drawn afresh at every step (1024, the official README's).
        num_global_views: how many of ``batch["views"]`` (the first ones) are global views (2).
        t_max, num_knots: the Epps-Pulley trapezoid grid, ``num_knots`` points on [-t_max, t_max] (5, 17).
        slice_seed: seed of the directions (default: the global seed). Each step's directions come from a
            generator seeded with (seed, optimizer step, micro-batch): the same on every rank, different at
            every step, and the same again on a resumed run.
    """

    def __init__(
        self,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        projection_layers: int = 3,
        sigreg_weight: float = 0.05,
        num_slices: int = 1024,
        num_global_views: int = 2,
        t_max: float = 5.0,
        num_knots: int = 17,
        slice_seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= sigreg_weight <= 1.0:
            raise ValueError(f"sigreg_weight (lambda) must lie in [0, 1], got {sigreg_weight}")
        if num_slices < 1:
            raise ValueError(f"num_slices must be at least 1, got {num_slices}")
        if num_global_views < 1:
            raise ValueError(f"num_global_views must be at least 1, got {num_global_views}")
        epps_pulley_knots(t_max, num_knots)  # a one-line error for a bad grid
        self.sigreg_weight, self.num_slices, self.num_global_views = sigreg_weight, num_slices, num_global_views
        self.t_max, self.num_knots = t_max, num_knots
        self.slice_seed = default_mask_seed(slice_seed)
        self.projector = MLPHead(self.backbone.feature_dim, projection_hidden_dim, projection_dim, projection_layers)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        recipe = getattr(self.trainer.datamodule, "views", None)
        if recipe is not None:
            self.check_views(recipe.num_views, recipe.num_views + recipe.num_local)

    def check_views(self, num_global: int, total: int) -> None:
        """A one-line error, before the first step, for data whose views the loss cannot use."""
        if total < 2 or num_global != self.num_global_views:
            raise ValueError(
                f"LeJEPA needs at least 2 views per image, the first num_global_views={self.num_global_views} "
                f"global; set data.init_args.views.num_views: {self.num_global_views} (got {num_global} global of "
                f"{total} views)"
            )

    def slice_directions(self, dim: int, device: torch.device, micro_batch: int = 0) -> torch.Tensor:
        """This step's unit directions (dim, num_slices), identical on every rank."""
        generator = step_generator(device, self.slice_seed, self.trainer.global_step, micro_batch)
        return slice_directions(dim, self.num_slices, generator)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views = batch["views"]
        shapes = {tuple(view.shape) for view in views[: self.num_global_views]}
        if len(views) < 2 or len(views) < self.num_global_views or len(shapes) != 1:
            raise ValueError(
                f"LeJEPA needs at least 2 views, the first {self.num_global_views} global views of one shape; got "
                f"shapes {[tuple(v.shape) for v in views]}"
            )
        features = self.features_by_resolution(views)
        embeddings = self.projector(torch.cat(features)).unflatten(0, (len(views), -1))  # (V, B, K)
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        directions = self.slice_directions(embeddings.shape[-1], embeddings.device, micro_batch)
        terms = lejepa_loss(
            embeddings, self.num_global_views, directions, self.sigreg_weight, self.t_max, self.num_knots
        )
        self.log("train/loss", terms.loss, prog_bar=True)
        self.log("train/prediction", terms.prediction)
        self.log("train/sigreg", terms.sigreg)
        return {"loss": terms.loss, "features": features[0].detach(), "embeddings": embeddings[0].detach()}
