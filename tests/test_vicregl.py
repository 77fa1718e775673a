"""VICRegL (Bardes, Ponce, LeCun 2022): the cells' source locations (a flipped view too), the location- and
feature-based matching and the whole loss against the paper's formulas written as loops over samples and cells,
2 gloo processes against one process on the full batch, the step's wiring, and one-line errors for bad input."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.datamodules.base import TensorImages
from ssl_lightning.losses.vicregl import cell_centres, nearest_pairs, vicregl_loss
from ssl_lightning.methods import VICRegL
from ssl_lightning.transforms import SimCLRViews
from tests.ddp_utils import as_one_process, run_distributed
from tests.tiny_methods import BACKBONE, one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step, stub_trainer

WEIGHTS = (25.0, 25.0, 1.0)
HEADS = {"projection_hidden_dim": 32, "projection_dim": 16, "local_projection_hidden_dim": 16, "local_projection_dim": 8}


def centre_by_formula(box: torch.Tensor, i: int, j: int, h: int, w: int) -> tuple[float, float]:
    """y = top + (i + 0.5) / h * height, x = left + (j' + 0.5) / w * width, j' = w - 1 - j when flipped."""
    top, left, height, width, flipped = (float(v) for v in box)
    column = w - 1 - j if flipped else j
    return top + (i + 0.5) / h * height, left + (column + 0.5) / w * width


def random_boxes(batch: int, generator: torch.Generator) -> torch.Tensor:
    size = 0.3 + 0.7 * torch.rand(batch, 2, generator=generator)
    corner = torch.rand(batch, 2, generator=generator) * (1 - size)
    flipped = (torch.rand(batch, 1, generator=generator) < 0.5).float()
    return torch.cat([corner, size, flipped], dim=1)


def test_cell_centres_follow_the_formula_and_mirror_a_flipped_view() -> None:
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.4, 0.0], [0.0, 0.3, 0.6, 0.7, 1.0], [0.25, 0.0, 0.75, 1.0, 1.0]])
    centres = cell_centres(boxes, 3, 4)
    assert centres.shape == (3, 3, 4, 2)
    for b in range(3):
        for i in range(3):
            for j in range(4):
                torch.testing.assert_close(centres[b, i, j].tolist(), list(centre_by_formula(boxes[b], i, j, 3, 4)))
    assert centres[1, 0, 0].tolist() == pytest.approx([0.5 / 3 * 0.6, 0.3 + 3.5 / 4 * 0.7])  # flipped: column 0 shows the right
    # the same crop mirrored: every cell's nearest cell in source coordinates is its mirror image, at distance 0
    same = cell_centres(torch.tensor([[0.1, 0.2, 0.5, 0.4, 0.0]]), 2, 3).flatten(1, 2)
    mirrored = cell_centres(torch.tensor([[0.1, 0.2, 0.5, 0.4, 1.0]]), 2, 3).flatten(1, 2)
    query, candidate = nearest_pairs(torch.cdist(same, mirrored), None)
    assert query.tolist() == [[0, 1, 2, 3, 4, 5]] and candidate.tolist() == [[2, 1, 0, 5, 4, 3]]


class CoordinateImages(SyntheticData):
    """64 px images whose first two channels are each pixel's source row and column (fractions), not normalized."""

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def train_source(self) -> Dataset:
        centres = (torch.arange(64) + 0.5) / 64
        rows, columns = centres[:, None].expand(64, 64), centres[None, :].expand(64, 64)
        image = (torch.stack([rows, columns, torch.zeros_like(rows)]) * 255).round().to(torch.uint8)
        return TensorImages(image[None].repeat(self.num_samples, 1, 1, 1), torch.zeros(self.num_samples, dtype=torch.long))


@pytest.mark.parametrize("views_on_device", [True, False], ids=["device-views", "worker-views"])
def test_the_datamodules_boxes_place_each_cell_where_its_pixels_came_from(views_on_device: bool) -> None:
    """A real batch (2 global 32 px views, 2 local 16 px views, flips): the mean source (row, column) of the pixels
    of each 8 x 8 cell (a CIFAR ResNet's feature-map cell) is ``cell_centres`` of the view's box."""
    recipe = SimCLRViews(32, scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, num_local=2, local_size=16,
                         local_scale=(0.1, 0.4))
    data = CoordinateImages(num_samples=32, batch_size=32, image_size=64, num_workers=0, seed=0, views=recipe,
                            views_on_device=views_on_device)
    data.setup("fit")
    data.trainer = stub_trainer()
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    assert len(batch["boxes"]) == len(batch["views"]) == 4
    for view, boxes in zip(batch["views"], batch["boxes"]):
        cells = F.avg_pool2d(view[:, :2], 8).permute(0, 2, 3, 1)
        torch.testing.assert_close(cells, cell_centres(boxes, *cells.shape[1:3]), atol=4 / 255, rtol=0)
    flipped = torch.stack([boxes[:, 4] for boxes in batch["boxes"]])
    assert 0 < flipped.sum() < flipped.numel()


# ---- the paper's formulas as loops -------------------------------------------------------------------------------
def matches_by_loop(distance: Any, query_cells: int, candidate_cells: int, gamma: Optional[int]) -> list[tuple[int, int]]:
    """For each query cell p: NN(p) = argmin_q distance(p, q); keep the gamma pairs of smallest distance; in p order."""
    nearest = [min(range(candidate_cells), key=lambda q: distance(p, q)) for p in range(query_cells)]
    ranked = sorted(range(query_cells), key=lambda p: (distance(p, nearest[p]), p))
    return [(p, nearest[p]) for p in sorted(ranked[: gamma or query_cells])]


def variance_covariance_by_loop(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """v = mean_d relu(1 - sqrt(Var(z^d) + 1e-4)) and c = sum_{d != e} Cov(z^d, z^e)^2 / D over n rows (N - 1)."""
    n, dim = len(rows), len(rows[0])
    mean = sum(rows) / n
    cov = [[sum((row[d] - mean[d]) * (row[e] - mean[e]) for row in rows) / (n - 1) for e in range(dim)]
           for d in range(dim)]
    variance = sum(torch.relu(1 - torch.sqrt(cov[d][d] + 1e-4)) for d in range(dim)) / dim
    return variance, sum(cov[d][e] ** 2 for d in range(dim) for e in range(dim) if d != e) / dim


def matched_by_loop(z1: torch.Tensor, z2: torch.Tensor, distance: Any, gamma: Optional[int]) -> torch.Tensor:
    """z (B, N, D): every sample's cells of view 1 matched into view 2 by ``distance(b, p, q)``; (s, v, c) of the
    pairs x[b][k], y[b][k]: the MSE, and v, c of each slot k's B vectors, averaged over the slots and both sides."""
    x, y = [], []
    for b in range(z1.shape[0]):
        pairs = matches_by_loop(lambda p, q: distance(b, p, q), z1.shape[1], z2.shape[1], gamma)
        x.append([z1[b, p] for p, _ in pairs])
        y.append([z2[b, q] for _, q in pairs])
    n, slots = len(x), len(x[0])
    invariance = sum(((x[b][k] - y[b][k]) ** 2).mean() for b in range(n) for k in range(slots)) / (n * slots)
    stats = [variance_covariance_by_loop([side[b][k] for b in range(n)]) for side in (x, y) for k in range(slots)]
    return torch.stack([invariance, *(sum(terms) / len(stats) for terms in zip(*stats))])


def weighted(terms: torch.Tensor) -> torch.Tensor:
    lam, mu, nu = WEIGHTS
    return lam * terms[0] + mu * terms[1] + nu * terms[2]


def vicregl_by_loop(z: list[torch.Tensor], maps: list[torch.Tensor], boxes: list[torch.Tensor], alpha: float,
                    location: tuple[int, int], features: Optional[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """alpha l(Z, Z') + (1 - alpha)(L_s + L_d) over the pairs (global i, any view j != i): l's invariance averaged
    over the pairs, its variance and covariance over the views; each local criterion (location-based: distance of
    the cells' centres in the source image; feature-based: of their embeddings) the mean of its two directions,
    gamma pairs kept from a global view's cells (a local view's: the second number)."""
    pairs, flat = [(i, j) for i in range(2) for j in range(len(z)) if j != i], [m.flatten(1, 2) for m in maps]
    places = [[[torch.tensor(centre_by_formula(box[b], i, j, *m.shape[1:3])) for i in range(m.shape[1])
                for j in range(m.shape[2])] for b in range(m.shape[0])] for box, m in zip(boxes, maps)]
    stats = [variance_covariance_by_loop(list(view)) for view in z]
    invariance = sum(((z[i] - z[j]) ** 2).mean() for i, j in pairs) / len(pairs)
    global_terms = torch.stack([invariance, *(sum(terms) / len(stats) for terms in zip(*stats))])

    def by_place(a: int, c: int) -> Any:
        return lambda b, p, q: float((places[a][b][p] - places[c][b][q]).norm())

    def by_feature(a: int, c: int) -> Any:
        return lambda b, p, q: float((flat[a][b, p] - flat[c][b, q]).detach().norm())

    local_terms = 0.0
    for i, j in pairs:
        for distance, matches in ((by_place, location), (by_feature, features)):
            gamma_i, gamma_j = (None, None) if matches is None else (matches[i >= 2], matches[j >= 2])
            local_terms = local_terms + (matched_by_loop(flat[i], flat[j], distance(i, j), gamma_i)
                                         + matched_by_loop(flat[j], flat[i], distance(j, i), gamma_j)) / 2
    local_terms = local_terms / len(pairs)
    return alpha * weighted(global_terms) + (1 - alpha) * weighted(local_terms), global_terms, local_terms


def loss_inputs(batch: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """2 global views (3 x 3 maps) and one local view (2 x 2): embeddings (B, 5), cell embeddings (B, h, w, 3)."""
    generator = torch.Generator().manual_seed(seed)
    z = [torch.randn(batch, 5, generator=generator, dtype=torch.float64) * 0.8 for _ in range(3)]
    maps = [torch.randn(batch, s, s, 3, generator=generator, dtype=torch.float64) for s in (3, 3, 2)]
    boxes = [random_boxes(batch, generator) for _ in range(3)]
    return z, maps, boxes


@pytest.mark.parametrize("features", [None, (4, 3)], ids=["every-feature-match", "top-gamma-feature-matches"])
def test_loss_matches_the_formulas_by_loops(features: Optional[tuple[int, int]]) -> None:
    z, maps, boxes = loss_inputs(4)
    inputs = [t.requires_grad_() for t in (*z, *maps)]
    centres = [cell_centres(box, *m.shape[1:3]) for box, m in zip(boxes, maps)]
    terms = vicregl_loss(z, maps, centres, 0.6, (5, 2), features)
    expected, global_terms, local_terms = vicregl_by_loop(z, maps, boxes, 0.6, (5, 2), features)
    torch.testing.assert_close(torch.stack(terms.global_terms[1:]), global_terms)
    torch.testing.assert_close(torch.stack(terms.local_terms[1:]), local_terms)
    torch.testing.assert_close(terms.loss, expected)
    for got, want in zip(torch.autograd.grad(terms.loss, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want)


def _loss_on_ranks(rank: int, world_size: int, z: list[torch.Tensor], maps: list[torch.Tensor],
                   boxes: list[torch.Tensor]) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = slice(rank * z[0].shape[0] // world_size, (rank + 1) * z[0].shape[0] // world_size)
    z, maps = [t[rows].clone().requires_grad_() for t in z], [t[rows].clone().requires_grad_() for t in maps]
    centres = [cell_centres(box[rows], *m.shape[1:3]) for box, m in zip(boxes, maps)]
    loss = vicregl_loss(z, maps, centres, 0.6, (5, 2), (4, 3)).loss
    loss, grads = as_one_process(loss, torch.autograd.grad(loss, [*z, *maps]))
    return {"loss": loss, "grads": grads}


def test_two_processes_equal_one_process_on_the_full_batch() -> None:
    inputs = loss_inputs(8, seed=1)
    two, one = run_distributed(_loss_on_ranks, 2, *inputs), _loss_on_ranks(0, 1, *inputs)
    torch.testing.assert_close(two["loss"], one["loss"])
    for got, want in zip(two["grads"], one["grads"]):
        torch.testing.assert_close(got, want)


def boxed_views(batch: int, seed: int = 0) -> dict[str, Any]:
    """``fixed_views`` with 2 global 16 px views and 2 local 8 px views, and a random crop box per view."""
    views = fixed_views(batch, 16, num_local=2, local_size=8, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return {**views, "boxes": [random_boxes(batch, generator) for _ in views["views"]]}


def test_step_is_the_loss_of_its_parts() -> None:
    torch.manual_seed(0)
    model = VICRegL(alpha=0.6, location_matches=(3, 1), feature_matches=(2, 1), **BACKBONE, **HEADS)
    batch = boxed_views(4)
    out, logged = run_training_step(model, batch)
    with torch.no_grad():
        maps = [model.backbone.feature_map(view) for view in batch["views"]]
        assert [tuple(m.shape[-2:]) for m in maps] == [(2, 2), (2, 2), (1, 1), (1, 1)]
        z = [model.projector(m.mean(dim=(2, 3))).double() for m in maps]
        cells = [model.local_projector(m.permute(0, 2, 3, 1).flatten(0, 2)).unflatten(0, (4, *m.shape[-2:])).double()
                 for m in maps]
    expected = vicregl_by_loop(z, cells, batch["boxes"], 0.6, (3, 1), (2, 1))[0]
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-4, atol=1e-5)
    assert {"train/global_loss", "train/local_loss", "train/local_invariance", "train/global_variance"} <= logged.keys()
    out["loss"].backward()
    assert model.local_projector[0].weight.grad.abs().sum() > 0 and model.projector[0].weight.grad.abs().sum() > 0


def test_bad_input_fails_with_one_line() -> None:
    vit = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                                       "num_heads": 2}}
    errors = []
    with pytest.raises(ValueError, match="VICRegL needs a backbone with a spatial feature map") as error:
        VICRegL(**vit, **HEADS)
    errors.append(error)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        VICRegL(alpha=1.5, **BACKBONE, **HEADS)
    model = VICRegL(**BACKBONE, **HEADS)
    with pytest.raises(ValueError, match=r"VICRegL needs each view's crop box in batch\['boxes'\].*got no boxes") as error:
        run_training_step(model, fixed_views(4, 16))
    errors.append(error)
    with pytest.raises(ValueError, match=r"location_matches=\[20, 4\] .* asks for 20 pairs of the 2 x 2 cells of view 0"
                       r"'s feature map: keep each gamma within 1..4") as error:
        run_training_step(model, boxed_views(4))
    errors.append(error)
    assert all("\n" not in str(e.value) for e in errors)
