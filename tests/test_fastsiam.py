"""FastSiam (Pototzky et al. 2022): the loss against a loop over images and views, SimSiam's loss at K = 2, the
step's stop-gradient on the averaged targets, and one-line errors for a view count the method cannot use."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ssl_lightning.losses import fastsiam_loss, negative_cosine_similarity
from ssl_lightning.methods import FastSiam
from ssl_lightning.transforms import SimCLRViews
from tests.tiny_methods import BACKBONE, one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

SMALL = {**BACKBONE, "projection_hidden_dim": 16, "projection_dim": 8, "prediction_hidden_dim": 4}


def fastsiam_by_loop(predictions: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """For every image b and view i: -cos(p_i[b], (1 / (K - 1)) sum_{j != i} z_j[b]), averaged over b and i."""
    views, images = len(predictions), predictions[0].shape[0]
    total = 0.0
    for b in range(images):
        for i in range(views):
            target = sum(targets[j][b] for j in range(views) if j != i) / (views - 1)
            p = predictions[i][b]
            total = total - torch.dot(p, target) / (p.norm() * target.norm())
    return total / (images * views)


@pytest.mark.parametrize("views", [2, 4])
def test_loss_matches_a_loop_over_images_and_views(views: int) -> None:
    generator = torch.Generator().manual_seed(views)
    p = [torch.randn(5, 6, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(views)]
    z = [torch.randn(5, 6, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(views)]
    actual, expected = fastsiam_loss(p, z), fastsiam_by_loop(p, z)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(torch.autograd.grad(actual, p + z), torch.autograd.grad(expected, p + z)):
        torch.testing.assert_close(got, want)
    if views == 2:  # SimSiam's symmetric loss (Algorithm 1)
        simsiam = negative_cosine_similarity(p[0], z[1]) / 2 + negative_cosine_similarity(p[1], z[0]) / 2
        torch.testing.assert_close(actual, simsiam)


def test_step_regresses_each_prediction_on_the_detached_mean_of_the_other_projections() -> None:
    torch.manual_seed(0)
    model = FastSiam(num_views=3, **SMALL)
    batch = fixed_views(6, 16, num_views=3)
    out, logged = run_training_step(model, batch)
    z = [model.projector(model(view)) for view in batch["views"]]
    p = [model.predictor(projection) for projection in z]
    expected = fastsiam_by_loop(p, [projection.detach() for projection in z])
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(logged["train/loss"], out["loss"].detach())
    # the stop-gradient: the loss's gradient equals that of the detached-target reference, not the undetached one
    grads = torch.autograd.grad(out["loss"], list(model.projector.parameters()))
    detached = torch.autograd.grad(expected, list(model.projector.parameters()), retain_graph=True)
    undetached = torch.autograd.grad(fastsiam_by_loop(p, z), list(model.projector.parameters()))
    for got, want in zip(grads, detached):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(g, u, rtol=1e-3, atol=1e-5) for g, u in zip(grads, undetached))


def test_a_view_count_it_cannot_use_fails_with_one_line() -> None:
    with pytest.raises(ValueError, match="num_views must be at least 2"):
        FastSiam(num_views=1, **SMALL)
    model = FastSiam(num_views=4, **SMALL)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(views=SimCLRViews(16, num_views=2)))
    with pytest.raises(ValueError, match=r"set data.init_args.views.num_views: 4 and num_local: 0, got 2 and 0") as error:
        model.setup("fit")
    assert "\n" not in str(error.value)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(views=SimCLRViews(16, num_views=4)))
    model.setup("fit")
