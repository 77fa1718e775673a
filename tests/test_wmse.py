"""W-MSE (Ermolov et al. 2021): whitening against a Cholesky written as loops (the whitened sub-batch has the
identity covariance), the loss against loops over sub-batches and view pairs, 2 gloo processes against one
process on the full batch, and one-line errors for sub-batches the whitening cannot use."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ssl_lightning.losses.wmse import whiten, wmse_loss
from ssl_lightning.methods import WMSE
from ssl_lightning.transforms import SimCLRViews
from tests.ddp_utils import as_one_process, run_distributed
from tests.tiny_methods import BACKBONE, one_thread  # noqa: F401 (autouse fixture)


def cholesky_by_loop(matrix: list[list[float]]) -> list[list[float]]:
    """Cholesky-Banachiewicz: L[i][j] = (A[i][j] - sum_k<j L[i][k] L[j][k]) / L[j][j], L[j][j] = sqrt(...)."""
    n = len(matrix)
    lower = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            rest = matrix[i][j] - sum(lower[i][k] * lower[j][k] for k in range(j))
            lower[i][j] = math.sqrt(rest) if i == j else rest / lower[j][j]
    return lower


def whiten_by_loop(x: torch.Tensor) -> torch.Tensor:
    """Center, covariance with N - 1, L by loops, then y_i = L^-1 (x_i - mean) by forward substitution."""
    rows, dim = x.shape
    mean = [sum(float(x[i, d]) for i in range(rows)) / rows for d in range(dim)]
    centered = [[float(x[i, d]) - mean[d] for d in range(dim)] for i in range(rows)]
    covariance = [[sum(c[a] * c[b] for c in centered) / (rows - 1) for b in range(dim)] for a in range(dim)]
    lower = cholesky_by_loop(covariance)
    out = []
    for c in centered:
        y: list[float] = []
        for a in range(dim):
            y.append((c[a] - sum(lower[a][k] * y[k] for k in range(a))) / lower[a][a])
        out.append(y)
    return torch.tensor(out, dtype=torch.float64)


def test_whitening_matches_a_loop_cholesky_and_gives_the_identity_covariance() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, dtype=torch.float64, generator=generator) @ torch.randn(4, 4, dtype=torch.float64, generator=generator)
    white = whiten(x)
    torch.testing.assert_close(white, whiten_by_loop(x))
    torch.testing.assert_close(torch.cov(white.T), torch.eye(4, dtype=torch.float64))
    assert whiten(x.float()).dtype == torch.float32


def wmse_by_loop(views: list[torch.Tensor], size: int, order: torch.Tensor) -> torch.Tensor:
    """Sub-batches ``order.view(-1, size)``: each view whitened there (loop Cholesky); the mean over every pair of
    views and every image of 2 - 2 cos(whitened_i, whitened_j)."""
    whitened = [torch.cat([whiten_by_loop(v[rows]) for rows in order.view(-1, size)]) for v in views]
    terms = []
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            for a, b in zip(whitened[i], whitened[j]):
                terms.append(2 - 2 * float(torch.dot(a, b) / (a.norm() * b.norm())))
    return torch.tensor(sum(terms) / len(terms), dtype=torch.float64)


@pytest.mark.parametrize("num_views", [2, 3])
def test_loss_matches_loops_over_sub_batches_and_view_pairs(num_views: int) -> None:
    generator = torch.Generator().manual_seed(num_views)
    views = [torch.randn(16, 3, dtype=torch.float64, generator=generator) for _ in range(num_views)]
    loss = wmse_loss(views, 8, torch.Generator().manual_seed(5))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, wmse_by_loop(views, 8, order))


def _loss_on_ranks(rank: int, world_size: int, z: torch.Tensor) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = slice(rank * z.shape[1] // world_size, (rank + 1) * z.shape[1] // world_size)
    views = [z[v, rows].clone().requires_grad_(True) for v in range(z.shape[0])]
    loss = wmse_loss(views, 8, torch.Generator().manual_seed(3))
    # every rank computes the global loss (their mean is that loss); DDP averages the gathered rows' gradients
    mean, grads = as_one_process(loss, torch.autograd.grad(loss, views))
    return {"loss": mean, "grads": grads}


def test_two_processes_equal_one_process_on_the_full_batch() -> None:
    """The sub-batches mix the ranks' images (the permutation is of the global batch, the same on every rank)."""
    z = torch.randn(2, 16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    two, one = run_distributed(_loss_on_ranks, 2, z), _loss_on_ranks(0, 1, z)
    torch.testing.assert_close(two["loss"], one["loss"])
    for got, want in zip(two["grads"], one["grads"]):
        torch.testing.assert_close(got, want)


def test_sub_batches_the_whitening_cannot_use_fail_with_one_line() -> None:
    with pytest.raises(ValueError, match=r"sub-batches of 4 embeddings of size 4: .* raise whitening_size above 4") as error:
        whiten(torch.randn(4, 4))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="whitening_size=32 must be larger than projection_dim=64"):
        WMSE(whitening_size=32, projection_dim=64, **BACKBONE)
    model = WMSE(projection_hidden_dim=16, projection_dim=4, whitening_size=16, **BACKBONE)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(views=SimCLRViews(16), batch_size=12), world_size=1)
    with pytest.raises(ValueError, match=r"the global batch \(12 x 1 processes\) is not a multiple of whitening_size=16"):
        model.setup("fit")
    model._trainer.datamodule.batch_size = 8
    model._trainer.world_size = 2
    model.setup("fit")
