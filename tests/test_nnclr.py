"""NNCLR (Dwibedi et al. 2021): the support-set lookup and eq. 2 against loops, 2 gloo processes against one
process on the full batch (the same support set on every rank, the other view's predictions gathered), the
step's wiring, and a queue size the global batch does not divide refused when the run starts."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses.nnclr import nearest_neighbours, nnclr_loss
from ssl_lightning.methods import NNCLR
from tests.ddp_utils import as_one_process, run_distributed
from tests.tiny_methods import BACKBONE, one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

TEMPERATURE = 0.2
SMALL = {**BACKBONE, "projection_hidden_dim": 16, "projection_dim": 8, "prediction_hidden_dim": 16}


def neighbours_by_loop(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    rows = []
    for row in z:
        similarities = [float(torch.dot(row, q) / (row.norm() * q.norm())) for q in support]
        rows.append(support[max(range(len(similarities)), key=similarities.__getitem__)])
    return torch.stack(rows)


def nnclr_by_loop(neighbours: torch.Tensor, predictions: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2: -log exp(NN_i . p_i / t) / sum_k exp(NN_i . p_k / t), unit vectors, averaged over i."""
    nn_unit = [v / v.norm() for v in neighbours]
    p_unit = [v / v.norm() for v in predictions]
    total = 0.0
    for i, anchor in enumerate(nn_unit):
        denominator = sum(torch.exp(torch.dot(anchor, p) / temperature) for p in p_unit)
        total = total - torch.log(torch.exp(torch.dot(anchor, p_unit[i]) / temperature) / denominator)
    return total / len(nn_unit)


def test_lookup_and_loss_match_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    support = F.normalize(torch.randn(12, 5, dtype=torch.float64, generator=generator), dim=1)
    z = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    found = nearest_neighbours(z, support)
    torch.testing.assert_close(found, neighbours_by_loop(z, support).to(found.dtype))
    predictions = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    actual = nnclr_loss(found.double(), predictions, TEMPERATURE)
    expected = nnclr_by_loop(found.double(), predictions, TEMPERATURE)
    torch.testing.assert_close(actual.double(), expected)
    torch.testing.assert_close(torch.autograd.grad(actual, predictions)[0],
                               torch.autograd.grad(expected, predictions)[0].to(torch.float32).double(),
                               rtol=1e-4, atol=1e-6)


def test_a_support_set_holding_the_targets_gives_a_low_loss() -> None:
    """When the support set holds each image's projection and the predictions equal it, the loss is ~0; a random
    support set is about ln N."""
    z = F.one_hot(torch.arange(8), 8).float()
    assert nnclr_loss(nearest_neighbours(z, z), z, 0.05) < 1e-6
    loss = nnclr_loss(torch.randn(256, 32), torch.randn(256, 32), 100.0)
    assert abs(float(loss) - math.log(256)) < 0.01


def _loss_on_ranks(rank: int, world_size: int, z: torch.Tensor, p: torch.Tensor, support: torch.Tensor) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = slice(rank * z.shape[1] // world_size, (rank + 1) * z.shape[1] // world_size)
    p1, p2 = (p[v, rows].clone().requires_grad_(True) for v in range(2))
    loss = (nnclr_loss(nearest_neighbours(z[0, rows], support), p2, TEMPERATURE)
            + nnclr_loss(nearest_neighbours(z[1, rows], support), p1, TEMPERATURE)) / 2
    mean, grads = as_one_process(loss, torch.autograd.grad(loss, (p1, p2)))
    return {"loss": mean, "grads": grads}


def test_two_processes_equal_one_process_on_the_full_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    z, p = torch.randn(2, 2, 8, 6, generator=generator)
    support = F.normalize(torch.randn(16, 6, generator=generator), dim=1)
    two, one = run_distributed(_loss_on_ranks, 2, z, p, support), _loss_on_ranks(0, 1, z, p, support)
    torch.testing.assert_close(two["loss"], one["loss"])
    for got, want in zip(two["grads"], one["grads"]):
        torch.testing.assert_close(got, want)


def test_step_uses_the_support_set_neighbours_and_returns_view_1_keys() -> None:
    torch.manual_seed(0)
    model = NNCLR(queue_size=32, temperature=TEMPERATURE, **SMALL)
    batch = fixed_views(8, 16)
    out, _ = run_training_step(model, batch)
    z1, z2 = model.projector(model(torch.cat(batch["views"]))).chunk(2)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    support = model.queue
    expected = (nnclr_by_loop(neighbours_by_loop(z1.detach(), support), p2, TEMPERATURE)
                + nnclr_by_loop(neighbours_by_loop(z2.detach(), support), p1, TEMPERATURE)) / 2
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["keys"], F.normalize(z1.detach(), dim=1), rtol=1e-5, atol=1e-6)


def test_a_queue_the_global_batch_does_not_divide_fails_when_the_run_starts() -> None:
    model = NNCLR(queue_size=100, **SMALL)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=16), world_size=2, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match=r"queue_size=100 is not a multiple of the global batch per optimizer step "
                                         r"\(16 x 2 processes x 1 accumulated = 32\); use e.g. queue_size=96") as error:
        model.setup("fit")
    assert "\n" not in str(error.value)
    model._trainer.datamodule.batch_size = 25
    model.setup("fit")  # 100 = 2 x (25 x 2 processes)
