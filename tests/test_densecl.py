"""DenseCL (Wang et al. 2021): the correspondence and the dense loss against loops over images and locations,
the step's wiring (global MoCo loss + dense loss on matched locations, the pooled dense keys for the second
queue), and one-line errors for a backbone without a feature map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses import infonce_queue_loss
from ssl_lightning.losses.densecl import dense_contrastive_loss, dense_correspondence
from ssl_lightning.methods import DenseCL, MoCoV2
from tests.tiny_methods import BACKBONE, HEADS, one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

TEMPERATURE = 0.3


def correspondence_by_loop(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """For each image b and query location i: the key location j with the largest cosine similarity."""
    rows = []
    for b in range(query.shape[0]):
        row = []
        for i in range(query.shape[2]):
            q = query[b, :, i]
            scores = [float(torch.dot(q, key[b, :, j]) / (q.norm() * key[b, :, j].norm())) for j in range(key.shape[2])]
            row.append(max(range(len(scores)), key=scores.__getitem__))
        rows.append(row)
    return torch.tensor(rows)


def dense_loss_by_loop(query: torch.Tensor, keys: torch.Tensor, matches: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """Eq. 2 of the paper per location: -log exp(q . k+ / t) / (exp(q . k+ / t) + sum_n exp(q . n / t)), averaged."""
    total, count = 0.0, 0
    for b in range(query.shape[0]):
        for i in range(query.shape[2]):
            q = query[b, :, i] / query[b, :, i].norm()
            k = keys[b, :, int(matches[b, i])]
            k = k / k.norm()
            positive = torch.exp(torch.dot(q, k) / TEMPERATURE)
            negatives = sum(torch.exp(torch.dot(q, n) / TEMPERATURE) for n in queue)
            total = total - torch.log(positive / (positive + negatives))
            count += 1
    return total / count


def test_correspondence_and_dense_loss_match_loops() -> None:
    generator = torch.Generator().manual_seed(0)
    query_features = torch.randn(2, 5, 6, dtype=torch.float64, generator=generator)
    key_features = torch.randn(2, 5, 4, dtype=torch.float64, generator=generator)
    matches = dense_correspondence(query_features, key_features)
    assert torch.equal(matches, correspondence_by_loop(query_features, key_features))
    query = torch.randn(2, 3, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    keys = torch.randn(2, 3, 4, dtype=torch.float64, generator=generator)
    queue = F.normalize(torch.randn(7, 3, dtype=torch.float64, generator=generator), dim=1)
    actual = dense_contrastive_loss(query, keys, matches, queue, TEMPERATURE)
    expected = dense_loss_by_loop(query, keys, matches, queue)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(torch.autograd.grad(actual, query)[0], torch.autograd.grad(expected, query)[0])


def test_a_dense_key_equal_to_its_query_gives_a_low_loss() -> None:
    query = F.one_hot(torch.arange(4), 8).float().T[None] * 10  # (1, 8, 4): four orthogonal locations
    matches = dense_correspondence(query, query)
    assert torch.equal(matches, torch.arange(4)[None])
    queue = -F.normalize(torch.ones(3, 8), dim=1)
    assert dense_contrastive_loss(query, query, matches, queue, 0.05) < 1e-6
    random = dense_contrastive_loss(torch.randn(4, 16, 9), torch.randn(4, 16, 9), torch.zeros(4, 9, dtype=torch.long),
                                    F.normalize(torch.randn(255, 16), dim=1), 100.0)
    assert abs(float(random) - math.log(256)) < 0.01


def test_step_combines_the_global_and_the_dense_loss_of_its_parts() -> None:
    torch.manual_seed(0)
    model = DenseCL(dense_hidden_dim=16, dense_weight=0.25, temperature=TEMPERATURE, **BACKBONE, **HEADS[MoCoV2])
    batch = fixed_views(4, 16)
    out, logged = run_training_step(model, batch)
    view1, view2 = batch["views"]
    with torch.no_grad():
        fq, fk = model.backbone.feature_map(view1), model.key_backbone.feature_map(view2)
        q, k = model.projector(fq.mean(dim=(2, 3))), F.normalize(model.key_projector(fk.mean(dim=(2, 3))), dim=1)
        q_dense, k_dense = model.dense_projector(fq), model.key_dense_projector(fk)
        matches = correspondence_by_loop(fq.flatten(2), fk.flatten(2))
        expected = 0.75 * infonce_queue_loss(q, k, model.queue, TEMPERATURE) + \
            0.25 * dense_loss_by_loop(q_dense.double(), k_dense.double(), matches, model.dense_queue.double())
    torch.testing.assert_close(out["loss"].double(), expected.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["dense_keys"], F.normalize(k_dense.mean(dim=2), dim=1), rtol=1e-5, atol=1e-6)
    assert {"train/global_loss", "train/dense_loss"} <= logged.keys()
    out["loss"].backward()
    assert model.dense_projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.key_dense_projector.parameters())


def test_a_backbone_without_a_feature_map_fails_with_one_line() -> None:
    vit = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                                       "num_heads": 2}}
    with pytest.raises(ValueError, match="DenseCL needs a backbone with a spatial feature map") as error:
        DenseCL(**vit, **HEADS[MoCoV2])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"dense_weight must lie in \[0, 1\], got 1.5"):
        DenseCL(dense_weight=1.5, **BACKBONE, **HEADS[MoCoV2])
