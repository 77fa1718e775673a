"""NT-Xent against the paper's formula, written as a slow loop; and 2-process DDP against one process."""

import math

import torch
import torch.nn.functional as F

from ssl_lightning.losses import nt_xent_loss
from tests.ddp_utils import run_distributed


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR eq. 1: l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), averaged over all 2N anchors."""
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        numerator = torch.exp(torch.dot(z[i], z[j]) / temperature)
        denominator = sum(torch.exp(torch.dot(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / (2 * n)


def test_nt_xent_matches_reference_value_and_gradients() -> None:
    z1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for temperature in (0.1, 0.5):
        loss = nt_xent_loss(z1, z2, temperature)
        expected = reference_nt_xent(z1, z2, temperature)
        torch.testing.assert_close(loss, expected)
        grads = torch.autograd.grad(loss, (z1, z2))
        expected_grads = torch.autograd.grad(expected, (z1, z2))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e)


def test_nt_xent_perfect_alignment_is_low_and_random_is_near_log_2n_minus_1() -> None:
    z = F.one_hot(torch.arange(8), 8).double()
    assert nt_xent_loss(z, z, 0.05) < 1e-6
    random_loss = nt_xent_loss(torch.randn(512, 64), torch.randn(512, 64), 10.0)
    assert abs(random_loss.item() - math.log(2 * 512 - 1)) < 0.01


def _ddp_nt_xent(rank: int, world_size: int, x: torch.Tensor, weight: torch.Tensor) -> dict:
    """Each rank embeds its shard with a shared linear layer; gradients are averaged as DDP does."""
    layer = torch.nn.Linear(x.shape[-1], 8, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    shard = x.chunk(world_size, dim=1)[rank]  # x: (2 views, N, D)
    loss = nt_xent_loss(layer(shard[0]), layer(shard[1]), 0.2)
    loss.backward()
    torch.distributed.all_reduce(layer.weight.grad)
    layer.weight.grad /= world_size
    losses = [torch.zeros_like(loss) for _ in range(world_size)]
    torch.distributed.all_gather(losses, loss.detach())
    return {"loss": torch.stack(losses).mean(), "grad": layer.weight.grad}


def test_nt_xent_two_processes_equal_one_process_on_full_batch() -> None:
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    weight = torch.randn(8, 6, dtype=torch.float64)
    result = run_distributed(_ddp_nt_xent, 2, x, weight)

    layer = torch.nn.Linear(6, 8, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    loss = nt_xent_loss(layer(x[0]), layer(x[1]), 0.2)
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach())
    torch.testing.assert_close(result["grad"], layer.weight.grad)
