"""TiCo (Zhu et al. 2022): the loss and the running covariance against the paper's formulas written as loops,
2 gloo processes against one process on the full batch (loss, gradients and the covariance), the buffer
carried from step to step, and a bad momentum refused with one line."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssl_lightning.losses.tico import tico_loss
from ssl_lightning.methods import TiCo
from tests.ddp_utils import as_one_process, run_distributed
from tests.tiny_methods import BACKBONE, one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

BETA, RHO = 0.7, 3.0


def tico_by_loop(z1: torch.Tensor, z2: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C_t[j][k] = beta C_{t-1}[j][k] + (1 - beta) (1/N) sum_i a_ij a_ik; L = 1 - (1/N) sum_i a_i . b_i
    + rho (1/N) sum_i sum_jk a_ij C_t[j][k] a_ik, with a, b the unit rows of z1, z2."""
    a = [row / row.norm() for row in z1]
    b = [row / row.norm() for row in z2]
    n, d = len(a), z1.shape[1]
    covariance = [[BETA * previous[j, k] + (1 - BETA) * sum(a[i][j] * a[i][k] for i in range(n)) / n
                   for k in range(d)] for j in range(d)]
    invariance = 1 - sum(torch.dot(a[i], b[i]) for i in range(n)) / n
    contrast = RHO * sum(sum(a[i][j] * covariance[j][k] * a[i][k] for j in range(d) for k in range(d))
                         for i in range(n)) / n
    return invariance + contrast, torch.stack([torch.stack(row) for row in covariance])


def test_loss_and_covariance_match_the_formulas_by_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(2))
    previous = torch.randn(4, 4, dtype=torch.float64, generator=generator)
    previous = previous @ previous.T / 4
    terms = tico_loss(z1, z2, previous, BETA, RHO)
    expected, expected_covariance = tico_by_loop(z1, z2, previous)
    torch.testing.assert_close(terms.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.covariance.double(), expected_covariance.detach(), rtol=1e-5, atol=1e-6)
    assert terms.covariance.dtype == torch.float32 and not terms.covariance.requires_grad
    for got, want in zip(torch.autograd.grad(terms.loss, (z1, z2)), torch.autograd.grad(expected, (z1, z2))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _steps_on_ranks(rank: int, world_size: int, z: torch.Tensor) -> dict[str, Any]:
    """Two steps; the second starts from the first's covariance."""
    torch.set_num_threads(1)
    rows = slice(rank * z.shape[2] // world_size, (rank + 1) * z.shape[2] // world_size)
    covariance = torch.zeros(z.shape[-1], z.shape[-1])
    results = []
    for step in range(2):
        z1, z2 = (z[step, v, rows].clone().requires_grad_(True) for v in range(2))
        terms = tico_loss(z1, z2, covariance, BETA, RHO)
        covariance = terms.covariance
        loss, grads = as_one_process(terms.loss, torch.autograd.grad(terms.loss, (z1, z2)))
        results.append({"loss": loss, "grads": grads, "covariance": covariance})
    return {"steps": results}


def test_two_processes_equal_one_process_on_the_full_batch() -> None:
    z = torch.randn(2, 2, 8, 6, generator=torch.Generator().manual_seed(1))
    two, one = run_distributed(_steps_on_ranks, 2, z)["steps"], _steps_on_ranks(0, 1, z)["steps"]
    for got, want in zip(two, one):
        torch.testing.assert_close(got["loss"], want["loss"])
        torch.testing.assert_close(got["covariance"], want["covariance"])
        for g, w in zip(got["grads"], want["grads"]):
            torch.testing.assert_close(g, w)


def test_the_step_carries_the_covariance_buffer() -> None:
    torch.manual_seed(0)
    model = TiCo(projection_hidden_dim=16, projection_dim=8, beta=BETA, rho=RHO, **BACKBONE)
    first, second = fixed_views(8, 16, seed=0), fixed_views(8, 16, seed=1)
    run_training_step(model, first)
    after_first = model.covariance.clone()
    assert after_first.abs().sum() > 0
    out, logged = run_training_step(model, second)
    z1, z2 = model.projector(model(torch.cat(second["views"]))).chunk(2)
    expected, expected_covariance = tico_by_loop(z1.double(), z2.double(), after_first.double())
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.covariance.double(), expected_covariance.detach(), rtol=1e-4, atol=1e-6)
    assert {"train/invariance", "train/contrast"} <= logged.keys()


def test_a_bad_momentum_fails_with_one_line() -> None:
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\), got 1.0"):
        TiCo(beta=1.0, **BACKBONE)
