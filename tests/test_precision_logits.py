"""NT-Xent and InfoNCE under bf16 autocast: the similarity logits are float32, and the loss and gradients match
a float64 reference to float32 tolerance (a bf16 matmul put 0.8% errors in NT-Xent's gradients at batch 256, T = 0.1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses import infonce_queue_loss, moco_v3_loss, nt_xent_loss

BATCH, DIM, QUEUE, T = 256, 64, 512, 0.1


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR eq. 1 in float64, one anchor at a time: -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    losses = []
    for i in range(2 * n):
        sims = z @ z[i] / temperature
        others = torch.cat([sims[:i], sims[i + 1 :]])
        losses.append(torch.logsumexp(others, 0) - sims[(i + n) % (2 * n)])
    return torch.stack(losses).mean()


def reference_infonce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE in float64: -log exp(q.k+/t) / (exp(q.k+/t) + sum_queue exp(q.n/t)), per query."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    losses = []
    for i in range(q.shape[0]):
        positive = torch.dot(q[i], k[i]) / temperature
        negatives = queue.double() @ q[i] / temperature
        losses.append(torch.logsumexp(torch.cat([positive[None], negatives]), 0) - positive)
    return torch.stack(losses).mean()


def reference_moco_v3(q1, q2, k1, k2, temperature: float) -> torch.Tensor:
    """MoCo v3's ctr(q1, k2) + ctr(q2, k1) in float64, each 2t x the cross-entropy of q against all keys."""

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
        losses = [torch.logsumexp(k @ q[i] / temperature, 0) - torch.dot(q[i], k[i]) / temperature for i in range(q.shape[0])]
        return torch.stack(losses).mean() * (2 * temperature)

    return ctr(q1, k2) + ctr(q2, k1)


def logits_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """Records the dtype of every logits tensor given to ``F.cross_entropy``."""
    seen: list[torch.dtype] = []
    cross_entropy = F.cross_entropy

    def recording(logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append(logits.dtype)
        return cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recording)
    return seen


CASES: dict[str, tuple[int, Callable, Callable]] = {
    "nt_xent": (2, lambda z1, z2: nt_xent_loss(z1, z2, T), lambda z1, z2: reference_nt_xent(z1, z2, T)),
    "moco_v3": (4, lambda *z: moco_v3_loss(*z, temperature=T), lambda *z: reference_moco_v3(*z, T)),
}


def queue_case() -> tuple[int, Callable, Callable]:
    queue = F.normalize(torch.randn(QUEUE, DIM, generator=torch.Generator().manual_seed(1)), dim=1)
    return 2, lambda q, k: infonce_queue_loss(q, k, queue, T), lambda q, k: reference_infonce_queue(q, k, queue, T)


@pytest.mark.parametrize("name", ["nt_xent", "moco_v3", "infonce_queue"])
def test_float32_inputs_under_bf16_autocast_match_float64(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 embeddings under bf16 autocast: loss and gradients as float64 up to float32 rounding."""
    count, loss_fn, reference_fn = queue_case() if name == "infonce_queue" else CASES[name]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(BATCH, DIM, generator=generator, requires_grad=True) for _ in range(count)]
    seen = logits_dtypes(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(*inputs)
    assert seen and all(dtype == torch.float32 for dtype in seen)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, inputs)
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    expected = reference_fn(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        scale = expected_grad.abs().max()
        assert (grad.double() - expected_grad).abs().max() / scale < 1e-4


@pytest.mark.parametrize("name", ["nt_xent", "moco_v3", "infonce_queue"])
def test_embeddings_of_a_bf16_linear_layer(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embeddings made by a Linear layer under bf16 autocast (bf16 tensors): float32 logits, the float64 loss of
    the same bf16 values, and gradients that differ from float64 only by their final rounding to bf16."""
    count, loss_fn, reference_fn = queue_case() if name == "infonce_queue" else CASES[name]
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, DIM)
    seen = logits_dtypes(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = [layer(torch.randn(BATCH, 32)) for _ in range(count)]
        assert all(e.dtype == torch.bfloat16 for e in embeddings)
        loss = loss_fn(*embeddings)
    assert seen and all(dtype == torch.float32 for dtype in seen)
    grads = torch.autograd.grad(loss, embeddings)

    leaves = [e.detach().double().requires_grad_() for e in embeddings]
    expected = reference_fn(*leaves)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, leaves)):
        assert grad.dtype == torch.bfloat16
        # rounding to bf16 moves a value by at most 2^-8 of itself; float32 arithmetic adds ~1e-6 of the largest
        bound = 2.0**-8 * expected_grad.abs() + 1e-5 * expected_grad.abs().max()
        assert ((grad.double() - expected_grad).abs() <= bound).all()
