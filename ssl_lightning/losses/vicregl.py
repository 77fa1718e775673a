"""VICRegL loss (Bardes, Ponce, LeCun 2022, "VICRegL: Self-Supervised Learning of Local Visual Features", sec. 3):
VICReg on the views' pooled embeddings (the global criterion) plus VICReg on pairs of local embeddings, the cells of
the feature maps, matched by their location in the source image and by their distance in embedding space (the local
criterion); ``alpha * global + (1 - alpha) * local``."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ssl_lightning.losses.barlow_twins import float32_or_wider
from ssl_lightning.losses.vicreg import VICRegLoss, global_mse, variance_covariance


class VICRegLLoss(NamedTuple):
    """``loss = alpha * global_terms.loss + (1 - alpha) * local_terms.loss``; each a weighted VICReg sum."""

    loss: torch.Tensor
    global_terms: VICRegLoss
    local_terms: VICRegLoss


def cell_centres(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Where the cells of an (height, width) feature map of a view lie in its source image: (B, height, width, 2)
    as (y, x) fractions of the source's height and width. ``boxes`` (B, 5) are the views' crops (top, left, height,
    width, flipped) as in ``batch["boxes"]``; cell (i, j) is centred at ``top + (i + 0.5) / h * height`` and
    ``left + (j' + 0.5) / w * width`` with ``j' = w - 1 - j`` in a view mirrored after cropping."""
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"cell_centres expects (B, 5) boxes (top, left, height, width, flipped), got {tuple(boxes.shape)}")
    boxes = float32_or_wider(boxes)
    top, left, box_height, box_width, flipped = boxes.unbind(dim=1)
    rows = (torch.arange(height, dtype=boxes.dtype, device=boxes.device) + 0.5) / height
    columns = (torch.arange(width, dtype=boxes.dtype, device=boxes.device) + 0.5) / width
    columns = torch.where(flipped[:, None] > 0.5, 1 - columns, columns)  # (B, w): (w - 1 - j + 0.5) / w = 1 - (j + 0.5) / w
    y = top[:, None] + rows * box_height[:, None]  # (B, h)
    x = left[:, None] + columns * box_width[:, None]  # (B, w)
    return torch.stack([y[:, :, None].expand(-1, -1, width), x[:, None, :].expand(-1, height, -1)], dim=-1)


@torch.no_grad()
def nearest_pairs(distances: torch.Tensor, num_matches: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query cell's nearest candidate in ``distances`` (B, Nq, Nc) (the first on ties), and of those pairs the
    ``num_matches`` (gamma) closest (the lower query index on ties; ``None``: every query cell): the (B, gamma) query
    and candidate indices, in query-cell order."""
    cells = distances.shape[1]
    if num_matches is not None and not 0 < num_matches <= cells:
        raise ValueError(f"num_matches={num_matches} must lie in [1, {cells}], the cells of the matched feature map")
    nearest, candidates = distances.min(dim=2).values, distances.argmin(dim=2)
    kept = nearest.argsort(dim=1, stable=True)[:, : num_matches or cells].sort(dim=1).values
    return kept, candidates.gather(1, kept)


def matched_terms(query: torch.Tensor, candidates: torch.Tensor, distances: torch.Tensor,
                  num_matches: Optional[int], eps: float) -> torch.Tensor:
    """VICReg's unweighted (invariance, variance, covariance) of the matched pairs (B, gamma, D): the mean squared
    error, and ``v``, ``c`` of each matched slot's (B, D) embeddings over the GLOBAL batch, averaged over the slots
    and the two sides (the official code's statistics). ``query`` (B, Nq, D), ``candidates`` (B, Nc, D)."""
    query_cells, candidate_cells = nearest_pairs(distances, num_matches)
    x = query.gather(1, query_cells[..., None].expand(-1, -1, query.shape[2]))
    y = candidates.gather(1, candidate_cells[..., None].expand(-1, -1, candidates.shape[2]))
    variance, covariance = variance_covariance(torch.stack([x, y]).transpose(1, 2), eps)  # (2, gamma) each
    return torch.stack([global_mse(x, y), variance.mean(), covariance.mean()])


def local_pair_terms(z1: torch.Tensor, z2: torch.Tensor, centres1: torch.Tensor, centres2: torch.Tensor,
                     location_matches: tuple[int, int], feature_matches: tuple[Optional[int], Optional[int]],
                     eps: float) -> torch.Tensor:
    """The local criterion of one pair of views, unweighted (invariance, variance, covariance): location-based
    plus feature-based matching, each the mean of its two directions (the cells of view 1 matched into view 2 and
    back). ``z`` (B, N, D) cell embeddings; ``centres`` (B, N, 2); ``*_matches``: gamma of each view's cells."""
    terms = torch.zeros(3, dtype=z1.dtype, device=z1.device)
    with torch.no_grad():
        location = torch.cdist(centres1.to(z1.dtype), centres2.to(z1.dtype))
        features = torch.cdist(z1.detach(), z2.detach())
    for distances, (gamma1, gamma2) in ((location, location_matches), (features, feature_matches)):
        terms = terms + (matched_terms(z1, z2, distances, gamma1, eps)
                         + matched_terms(z2, z1, distances.transpose(1, 2), gamma2, eps)) / 2
    return terms


def vicregl_loss(
    embeddings: list[torch.Tensor],
    local_embeddings: list[torch.Tensor],
    centres: list[torch.Tensor],
    alpha: float = 0.75,
    location_matches: tuple[int, int] = (20, 4),
    feature_matches: Optional[tuple[int, int]] = None,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    num_global: int = 2,
    eps: float = 1e-4,
) -> VICRegLLoss:
    """VICRegL's ``alpha * l(Z, Z') + (1 - alpha) * (L_s + L_d)`` over the views, global views first.

    ``embeddings``: one (B, D) expander output per view; ``local_embeddings``: one (B, h, w, D') local-projector
    map per view (multi-crop: smaller maps for the local crops); ``centres``: their cells' source locations
    (``cell_centres``). ``l = lambda s + mu v + nu c`` is VICReg's criterion with its terms from ``losses.vicreg``.

    Global: ``s`` averaged over the pairs (global view i, any other view j), ``v`` and ``c`` averaged over the
    views. Local, for the same pairs: location-based matching (``L_s``: each cell of one view and the cell of the
    other view nearest in the source image, the ``location_matches`` closest pairs kept: gamma for a global view's
    cells, for a local view's) plus feature-based matching (``L_d``: the nearest cell in embedding space, l2;
    ``feature_matches`` of them, ``None``: every cell as the official code's default), each in both directions;
    ``v`` and ``c`` over each matched slot's embeddings across the batch. Averaging (not summing) the two sides'
    ``v`` and ``c`` is the official code's, for which the paper's 25/25/1 were set. All batch statistics span the
    GLOBAL batch (all-reduced with gradient). Computed in float32 under autocast.
    """
    views = len(embeddings)
    if not 2 <= num_global <= views or len(local_embeddings) != views or len(centres) != views:
        raise ValueError(f"vicregl_loss expects {num_global} global views and one embedding, local map and centres "
                         f"per view, got {views}, {len(local_embeddings)} and {len(centres)}")
    pairs = [(i, j) for i in range(num_global) for j in range(views) if j != i]
    by_location = [location_matches[view >= num_global] for view in range(views)]
    by_features = [None if feature_matches is None else feature_matches[view >= num_global] for view in range(views)]
    for name, setting, gammas in (("location_matches", location_matches, by_location),
                                  ("feature_matches", feature_matches, by_features)):
        for view, (gamma, cells) in enumerate(zip(gammas, local_embeddings)):
            h, w = cells.shape[1:3]
            if gamma is not None and not 0 < gamma <= h * w:
                raise ValueError(f"{name}={list(setting)} (global, local views) asks for {gamma} pairs of the {h} x {w} "
                                 f"cells of view {view}'s feature map: keep each gamma within 1..{h * w}")
    with torch.autocast(embeddings[0].device.type, enabled=False):
        z = float32_or_wider(torch.stack(embeddings))  # (V, B, D)
        invariance = torch.stack([global_mse(z[i], z[j]) for i, j in pairs]).mean()
        variance, covariance = (term.mean() for term in variance_covariance(z, eps))
        global_terms = VICRegLoss(invariance_weight * invariance + variance_weight * variance
                                  + covariance_weight * covariance, invariance, variance, covariance)
        maps = [float32_or_wider(m).flatten(1, 2) for m in local_embeddings]
        places = [c.flatten(1, 2) for c in centres]
        local = torch.stack([
            local_pair_terms(maps[i], maps[j], places[i], places[j], (by_location[i], by_location[j]),
                             (by_features[i], by_features[j]), eps)
            for i, j in pairs]).mean(dim=0)
        local_terms = VICRegLoss(invariance_weight * local[0] + variance_weight * local[1]
                                 + covariance_weight * local[2], *local)
    return VICRegLLoss(alpha * global_terms.loss + (1 - alpha) * local_terms.loss, global_terms, local_terms)
