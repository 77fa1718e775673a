"""MoCo's InfoNCE with a queue and MoCo v3's loss against slow references; 2-process DDP against one
process; BYOL's and SimSiam's cosine losses."""

import math

import torch
import torch.nn.functional as F

from ssl_lightning.losses import infonce_queue_loss, moco_v3_loss, negative_cosine_similarity, normalized_mse
from tests.ddp_utils import run_distributed


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def reference_infonce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo eq. 1: L_q = -log exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.queue_j/t)), averaged over queries."""
    total = 0.0
    for qi, ki in zip(q, k):
        qi, ki = _unit(qi), _unit(ki)
        positive = torch.exp(torch.dot(qi, ki) / temperature)
        negatives = sum(torch.exp(torch.dot(qi, key) / temperature) for key in queue)
        total = total - torch.log(positive / (positive + negatives))
    return total / q.shape[0]


def reference_moco_v3(q1, q2, k1, k2, temperature: float) -> torch.Tensor:
    """MoCo v3 Algorithm 1: ctr(q, k) = CE over the batch's keys (own key positive) x 2t; ctr(q1,k2) + ctr(q2,k1)."""

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for i in range(q.shape[0]):
            scores = [torch.exp(torch.dot(_unit(q[i]), _unit(k[j])) / temperature) for j in range(k.shape[0])]
            total = total - torch.log(scores[i] / sum(scores))
        return total / q.shape[0] * 2 * temperature

    return ctr(q1, k2) + ctr(q2, k1)


def test_infonce_queue_matches_reference_value_and_gradients() -> None:
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1)
    for temperature in (0.07, 0.2):
        loss = infonce_queue_loss(q, k, queue, temperature)
        expected = reference_infonce_queue(q, k, queue, temperature)
        torch.testing.assert_close(loss, expected)
        for g, e in zip(torch.autograd.grad(loss, (q, k)), torch.autograd.grad(expected, (q, k))):
            torch.testing.assert_close(g, e)


def test_infonce_queue_random_keys_give_about_log_of_candidates() -> None:
    q, k = torch.randn(256, 128), torch.randn(256, 128)
    queue = F.normalize(torch.randn(1023, 128), dim=1)
    assert abs(infonce_queue_loss(q, k, queue, 10.0).item() - math.log(1024)) < 0.01


def test_moco_v3_loss_matches_reference_value_and_gradients() -> None:
    tensors = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    for temperature in (0.2, 1.0):
        loss = moco_v3_loss(*tensors, temperature)
        expected = reference_moco_v3(*tensors, temperature)
        torch.testing.assert_close(loss, expected)
        for g, e in zip(torch.autograd.grad(loss, tensors), torch.autograd.grad(expected, tensors)):
            torch.testing.assert_close(g, e)


def _embed(x: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    """Queries of both views through layer 0, keys through layer 1 (keys with gradient here, to check
    that the gather passes it back)."""
    return [x[0] @ weights[0].T, x[1] @ weights[0].T, x[0] @ weights[1].T, x[1] @ weights[1].T]


def _ddp_moco_v3(rank: int, world_size: int, x: torch.Tensor, weights: torch.Tensor) -> dict:
    weights = weights.clone().requires_grad_(True)
    q1, q2, k1, k2 = _embed(x.chunk(world_size, dim=1)[rank], weights)
    loss = moco_v3_loss(q1, q2, k1, k2, 0.2)
    loss.backward()
    torch.distributed.all_reduce(weights.grad)  # DDP averages gradients over ranks
    losses = [torch.zeros_like(loss) for _ in range(world_size)]
    torch.distributed.all_gather(losses, loss.detach())
    return {"loss": torch.stack(losses).mean(), "grad": weights.grad / world_size}


def test_moco_v3_two_processes_equal_one_process_on_full_batch() -> None:
    x = torch.randn(2, 8, 6, dtype=torch.float64)  # (views, global batch, features)
    weights = torch.randn(2, 5, 6, dtype=torch.float64)
    result = run_distributed(_ddp_moco_v3, 2, x, weights)

    weights = weights.clone().requires_grad_(True)
    loss = moco_v3_loss(*_embed(x, weights), 0.2)
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach())
    torch.testing.assert_close(result["grad"], weights.grad)


def test_cosine_losses() -> None:
    p, z = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    expected = torch.stack([(_unit(a) - _unit(b)).pow(2).sum() for a, b in zip(p, z)]).mean()
    torch.testing.assert_close(normalized_mse(p, z), expected)
    torch.testing.assert_close(normalized_mse(p, z), 2 - 2 * F.cosine_similarity(p, z).mean())
    torch.testing.assert_close(negative_cosine_similarity(p, 3 * p), torch.tensor(-1.0, dtype=torch.float64))
