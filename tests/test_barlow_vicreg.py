"""Barlow Twins and VICReg losses against the papers' formulas written as slow loops; both under 2-process
DDP against one process on the full batch; the methods' training steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.losses import barlow_twins_loss, vicreg_loss
from ssl_lightning.methods import BarlowTwins, VICReg
from ssl_lightning.nn import MLPHead
from ssl_lightning.optim import OptimConfig
from tests.ddp_utils import run_distributed


def embeddings(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated views with dimensions of different spread (some under VICReg's std target of 1)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 1.6, d, dtype=torch.float64)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 0.5
    z2 = z1 + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return z1.requires_grad_(), z2.requires_grad_()


def reference_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> tuple:
    """Eq. 1-2: c_ij = sum_b z1n[b,i] z2n[b,j] / N on per-dimension batch-normalized embeddings (mean,
    biased variance, as BatchNorm in training mode); sum_i (1 - c_ii)^2 + lambda sum_{i != j} c_ij^2."""
    n, d = z1.shape

    def normalized(z: torch.Tensor) -> list[list[torch.Tensor]]:  # [dimension][sample]
        columns = []
        for i in range(d):
            mean = sum(z[b, i] for b in range(n)) / n
            var = sum((z[b, i] - mean) ** 2 for b in range(n)) / n
            columns.append([(z[b, i] - mean) / torch.sqrt(var + eps) for b in range(n)])
        return columns

    a, b_ = normalized(z1), normalized(z2)
    c = [[sum(a[i][b] * b_[j][b] for b in range(n)) / n for j in range(d)] for i in range(d)]
    on_diag = sum((1 - c[i][i]) ** 2 for i in range(d))
    off_diag = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on_diag + lambd * off_diag, on_diag, off_diag


def reference_vicreg(z1: torch.Tensor, z2: torch.Tensor, weights: tuple[float, float, float]) -> tuple:
    """Algorithm 1: invariance MSE; per branch mean_j relu(1 - sqrt(Var(z^j) + 1e-4)) and
    sum_{i != j} Cov(Z)_ij^2 / D with variance and covariance over N - 1; both branches summed."""
    n, d = z1.shape
    invariance = sum((z1[b, k] - z2[b, k]) ** 2 for b in range(n) for k in range(d)) / (n * d)
    variance, covariance = 0.0, 0.0
    for z in (z1, z2):
        means = [sum(z[b, k] for b in range(n)) / n for k in range(d)]
        cov = [[sum((z[b, i] - means[i]) * (z[b, j] - means[j]) for b in range(n)) / (n - 1) for j in range(d)]
               for i in range(d)]
        variance = variance + sum(F.relu(1 - torch.sqrt(cov[k][k] + 1e-4)) for k in range(d)) / d
        covariance = covariance + sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    lam, mu, nu = weights
    return lam * invariance + mu * variance + nu * covariance, invariance, variance, covariance


def assert_terms_and_gradients_match(ours: tuple, expected: tuple, inputs: tuple[torch.Tensor, ...]) -> None:
    for value, reference in zip(ours, expected):
        torch.testing.assert_close(value, reference)
        for g, e in zip(torch.autograd.grad(value, inputs, retain_graph=True),
                        torch.autograd.grad(reference, inputs, retain_graph=True)):
            torch.testing.assert_close(g, e)


def test_barlow_twins_matches_the_paper_formula_terms_and_gradients() -> None:
    z1, z2 = embeddings()
    for lambd in (0.0051, 0.5):
        ours = barlow_twins_loss(z1, z2, lambd)
        assert_terms_and_gradients_match(ours, reference_barlow_twins(z1, z2, lambd), (z1, z2))
    # the official code's formulation: a non-affine BatchNorm, then bn(z1).T @ bn(z2) / N
    bn = torch.nn.BatchNorm1d(5, affine=False, dtype=torch.float64)
    c = bn(z1).T @ bn(z2) / 6
    official = (1 - c.diagonal()).pow(2).sum() + 0.0051 * (c.pow(2).sum() - c.diagonal().pow(2).sum())
    torch.testing.assert_close(barlow_twins_loss(z1, z2).loss, official)


def test_vicreg_matches_the_paper_pseudocode_terms_and_gradients() -> None:
    z1, z2 = embeddings()
    for weights in ((25.0, 25.0, 1.0), (1.0, 3.0, 0.5)):
        ours = vicreg_loss(z1, z2, *weights)
        assert ours.variance > 0.1  # the hinge is active on the narrow dimensions
        assert_terms_and_gradients_match(ours, reference_vicreg(z1, z2, weights), (z1, z2))
    collapsed = torch.ones(8, 4)  # every dimension constant: std = sqrt(1e-4), hinge 0.99 per branch
    torch.testing.assert_close(vicreg_loss(collapsed, collapsed).variance, torch.tensor(2 * 0.99))


def test_barlow_twins_reaches_zero_on_identical_whitened_views() -> None:
    basis = torch.cat([torch.ones(16, 1, dtype=torch.float64), torch.randn(16, 15, dtype=torch.float64)], dim=1)
    q, _ = torch.linalg.qr(basis)
    z = q[:, 1:] * 4.0  # columns orthogonal to the constant vector and to each other, norm 4 = sqrt(N)
    terms = barlow_twins_loss(z, z, eps=0.0)
    assert terms.loss.abs() < 1e-10 and terms.off_diag.abs() < 1e-10


@pytest.mark.parametrize("loss_fn", [barlow_twins_loss, vicreg_loss])
def test_mixed_precision_inputs_are_reduced_in_float32(loss_fn: Callable) -> None:
    z1, z2 = (z.detach().to(torch.bfloat16) for z in embeddings(n=16, d=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(z1, z2)
    assert low.loss.dtype == torch.float32
    torch.testing.assert_close(low.loss, loss_fn(z1.float(), z2.float()).loss)


@pytest.mark.parametrize("loss_fn", [barlow_twins_loss, vicreg_loss])
def test_the_last_projector_bias_gets_no_gradient(loss_fn: Callable) -> None:
    head = MLPHead(6, 8, 5, num_layers=3).double()
    x1, x2 = torch.randn(2, 10, 6, dtype=torch.float64)
    loss_fn(head(x1), head(x2)).loss.backward()
    assert head[-1].weight.grad.abs().max() > 1e-6
    assert head[-1].bias.grad.abs().max() < 1e-10


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"\(4,\) and \(4,\)"):
        vicreg_loss(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(torch.randn(1, 3), torch.randn(1, 3))


LOSSES: dict[str, Callable] = {"barlow": lambda a, b: barlow_twins_loss(a, b, 0.3), "vicreg": vicreg_loss}


def _embed(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.fill_(0.3)
    z1, z2 = layer(x[0]), layer(x[1])
    z1.retain_grad()
    z2.retain_grad()
    return layer, z1, z2


def _ddp_losses(rank: int, world_size: int, x: torch.Tensor, weight: torch.Tensor) -> dict[str, Any]:
    """Each rank embeds its shard with a shared linear layer; gradients are averaged as DDP does."""
    results: dict[str, Any] = {}
    for name, loss_fn in LOSSES.items():
        layer, z1, z2 = _embed(x.chunk(world_size, dim=1)[rank], weight)  # x: (2 views, N, D)
        terms = torch.stack(list(loss_fn(z1, z2)))
        terms[0].backward()
        grads = [layer.weight.grad, layer.bias.grad]
        for g in grads:
            torch.distributed.all_reduce(g)
            g /= world_size
        parts = [torch.zeros_like(terms) for _ in range(world_size)]
        torch.distributed.all_gather(parts, terms.detach())
        embedding_grads = []
        for z in (z1, z2):  # each rank's rows, averaged over ranks as DDP does with the parameter gradients
            rows = [torch.zeros_like(z.grad) for _ in range(world_size)]
            torch.distributed.all_gather(rows, z.grad)
            embedding_grads.append(torch.cat(rows) / world_size)
        results[name] = {"terms": torch.stack(parts), "grads": grads, "embedding_grads": embedding_grads}
    return results


def test_two_processes_equal_one_process_on_the_full_batch() -> None:
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    weight = torch.randn(5, 6, dtype=torch.float64) * torch.linspace(0.2, 1.5, 5, dtype=torch.float64)[:, None]
    result = run_distributed(_ddp_losses, 2, x, weight)
    for name, loss_fn in LOSSES.items():
        layer, z1, z2 = _embed(x, weight)
        terms = torch.stack(list(loss_fn(z1, z2)))
        terms[0].backward()
        ours = result[name]
        for rank_terms in ours["terms"]:  # every rank computes the global loss and its terms
            torch.testing.assert_close(rank_terms, terms.detach())
        torch.testing.assert_close(ours["grads"], [layer.weight.grad, layer.bias.grad])
        torch.testing.assert_close(ours["embedding_grads"], [z1.grad, z2.grad])


class _Outputs(Callback):
    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.outputs = outputs


@pytest.mark.parametrize(
    ("cls", "kwargs", "terms"),
    [
        (BarlowTwins, {"off_diagonal_weight": 0.01}, ["on_diag", "off_diag"]),
        (VICReg, {"variance_weight": 20.0}, ["invariance", "variance", "covariance"]),
    ],
)
def test_training_step_returns_the_contract_and_logs_the_terms(
    cls: type, kwargs: dict[str, Any], terms: list[str], tmp_path: Path
) -> None:
    seed_everything(0, verbose=False)
    model = cls(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
                projection_dim=16, optim=OptimConfig(name="sgd", lr=0.1, warmup_epochs=0), **kwargs)
    outputs = _Outputs()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, callbacks=[outputs])
    trainer.fit(model, SyntheticData(num_samples=16, batch_size=8, image_size=16, num_workers=0, seed=0))
    logged = trainer.logged_metrics
    assert all(math.isfinite(logged[f"train/{t}"]) for t in ["loss", *terms])
    out = outputs.outputs
    assert out["features"].shape == (8, model.backbone.feature_dim) and not out["features"].requires_grad
    assert out["embeddings"].shape == (8, 16) and not out["embeddings"].requires_grad
