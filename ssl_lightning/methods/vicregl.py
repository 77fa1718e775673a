"""VICRegL (Bardes, Ponce, LeCun 2022, "VICRegL: Self-Supervised Learning of Local Visual Features"): VICReg on
the views' pooled features, and VICReg on the cells of their feature maps, each cell paired with the other view's
cell nearest in the source image and with its nearest neighbour in embedding space."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ssl_lightning.losses.vicregl import cell_centres, vicregl_loss
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.nn import MLPHead


class VICRegL(SSLMethod):
    """Args (besides ``SSLMethod``'s):
        projection_hidden_dim, projection_dim, projection_layers: the expander of the pooled features (VICReg's;
            8192-8192-8192 on ImageNet).
        local_projection_hidden_dim, local_projection_dim, local_projection_layers: the local projector, the same
            MLP applied to every cell of the feature map (512-512-512 on ImageNet).
        alpha: the global criterion's share, ``alpha * global + (1 - alpha) * local`` (0.75; 0.9 favours
            classification, sec. 4).
        location_matches: gamma, the location-matched pairs kept from the cells of a global view and of a local
            view (20 of 7 x 7 and 4 of 3 x 3 on ImageNet).
        feature_matches: the same for the feature-matched pairs; ``None`` keeps every cell (the official code).
        invariance_weight, variance_weight, covariance_weight: lambda, mu, nu (25, 25, 1).

    Needs a backbone with a spatial feature map (``feature_map``: the ResNets, ConvNeXts), checked when built, and
    each view's crop box in ``batch["boxes"]`` (docs/CONTRACTS.md). Views: 2 global, then any local crops.
    """

    def __init__(
        self,
        projection_hidden_dim: int = 8192,
        projection_dim: int = 8192,
        projection_layers: int = 3,
        local_projection_hidden_dim: int = 512,
        local_projection_dim: int = 512,
        local_projection_layers: int = 3,
        alpha: float = 0.75,
        location_matches: tuple[int, int] = (20, 4),
        feature_matches: Optional[tuple[int, int]] = None,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.require_feature_map()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.criterion = {"alpha": alpha, "location_matches": tuple(location_matches),
                          "feature_matches": None if feature_matches is None else tuple(feature_matches),
                          "invariance_weight": invariance_weight, "variance_weight": variance_weight,
                          "covariance_weight": covariance_weight}
        dim = self.backbone.feature_dim
        self.projector = MLPHead(dim, projection_hidden_dim, projection_dim, projection_layers)
        self.local_projector = MLPHead(dim, local_projection_hidden_dim, local_projection_dim, local_projection_layers)

    def project_cells(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The local projector at every cell of a (B, C, h, w) map: (B, h, w, D); its BatchNorms see all cells."""
        cells = feature_map.permute(0, 2, 3, 1)
        return self.local_projector(cells.flatten(0, 2)).unflatten(0, cells.shape[:3])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        views, boxes = batch["views"], crop_boxes(batch)
        maps = [self.backbone.feature_map(self.to_memory_format(view)) for view in views]
        features = [feature_map.mean(dim=(2, 3)) for feature_map in maps]
        z = [self.projector(f) for f in features]
        z_local = [self.project_cells(feature_map) for feature_map in maps]
        centres = [cell_centres(box, *feature_map.shape[-2:]) for box, feature_map in zip(boxes, maps)]
        terms = vicregl_loss(z, z_local, centres, **self.criterion)
        self.log("train/loss", terms.loss, prog_bar=True)
        for scope, part in (("global", terms.global_terms), ("local", terms.local_terms)):
            self.log(f"train/{scope}_loss", part.loss)
            self.log(f"train/{scope}_invariance", part.invariance)
            self.log(f"train/{scope}_variance", part.variance)
            self.log(f"train/{scope}_covariance", part.covariance)
        return {"loss": terms.loss, "features": features[0].detach(), "embeddings": z[0].detach()}


def crop_boxes(batch: dict[str, Any]) -> list[torch.Tensor]:
    """``batch["boxes"]``, one (B, 5) crop box per view; one line naming what is missing otherwise."""
    boxes = batch.get("boxes")
    if boxes is None or len(boxes) != len(batch["views"]):
        found = "no boxes" if boxes is None else f"{len(boxes)} boxes for {len(batch['views'])} views"
        raise ValueError(f"VICRegL needs each view's crop box in batch['boxes'] (one (B, 5) tensor per view: top, "
                         f"left, height, width, flipped; docs/CONTRACTS.md) to match cells by location; got {found}")
    return boxes
