"""DINO's loss against a loop over crop pairs, the center's EMA, both on 2 gloo processes against one process on the
full batch (loss, gradients and center over two steps), and the teacher temperature schedule. Light imports: the
spawned processes import this module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_lightning.distributed import all_reduce_mean_, gather_no_grad
from ssl_lightning.losses import dino_loss, teacher_entropy, teacher_temperature, update_center_
from tests.ddp_utils import run_distributed


def slow_dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, tau_s: float,
                   tau_t: float) -> torch.Tensor:
    """Eq. 3 term by term: every (global teacher crop, other student crop) pair, every sample, every class."""
    total, terms = torch.zeros(()), 0
    for iq, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:  # same view for teacher and student
                continue
            pair = torch.zeros(())
            for b in range(t.shape[0]):
                p_t = torch.exp((t[b] - center[0]) / tau_t) / torch.exp((t[b] - center[0]) / tau_t).sum()
                log_p_s = s[b] / tau_s - torch.logsumexp(s[b] / tau_s, dim=0)
                pair = pair + sum(-p_t[k].detach() * log_p_s[k] for k in range(t.shape[1]))
            total, terms = total + pair / t.shape[0], terms + 1
    return total / terms


def test_loss_matches_a_loop_over_crop_pairs() -> None:
    torch.manual_seed(0)
    student = [torch.randn(3, 5, requires_grad=True) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    center = torch.randn(1, 5)
    loss = dino_loss(student, teacher, center, 0.1, 0.04)
    reference = slow_dino_loss(student, teacher, center, 0.1, 0.04)
    torch.testing.assert_close(loss, reference)
    grads = torch.autograd.grad(loss, student, retain_graph=True)
    reference_grads = torch.autograd.grad(reference, student)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected)
    loss.backward()
    assert all(t.grad is None for t in teacher)  # no gradient into the teacher
    with pytest.raises(ValueError, match="shape"):
        dino_loss(student + [torch.randn(3, 6)], teacher, center, 0.1, 0.04)


def test_teacher_entropy_is_log_k_at_uniform_collapse_and_the_loss_minus_it_is_the_kl() -> None:
    torch.manual_seed(0)
    student = [torch.randn(3, 5) for _ in range(4)]
    teacher = [torch.randn(3, 5) * 0.1 for _ in range(2)]
    center, tau_s, tau_t = torch.randn(1, 5) * 0.1, 0.1, 0.04
    entropy = teacher_entropy(torch.cat(teacher), center, tau_t)
    kl, entropies, pairs = 0.0, [], 0
    for g, t in enumerate(teacher):
        for b in range(t.shape[0]):
            p_t = [float(x) for x in torch.softmax((t[b] - center[0]) / tau_t, dim=0)]
            entropies.append(-sum(p * np.log(p) for p in p_t))
            for v, s in enumerate(student):
                if v != g:
                    p_s = [float(x) for x in torch.softmax(s[b] / tau_s, dim=0)]
                    kl, pairs = kl + sum(p * np.log(p / q) for p, q in zip(p_t, p_s)), pairs + 1
    assert float(entropy) == pytest.approx(np.mean(entropies), rel=1e-5)
    assert float(dino_loss(student, teacher, center, tau_s, tau_t) - entropy) == pytest.approx(kl / pairs, rel=1e-4)
    # every sample's output equal to the center: the uniform distribution (DINO's uniform collapse)
    assert float(teacher_entropy(center.expand(4, 5), center, tau_t)) == pytest.approx(np.log(5))
    with pytest.raises(ValueError, match="teacher_logits"):
        teacher_entropy(torch.randn(4, 6), center, tau_t)


def test_center_is_an_ema_of_the_batch_mean() -> None:
    torch.manual_seed(0)
    center, teacher = torch.randn(1, 6), torch.randn(10, 6)
    expected = 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(update_center_(center, teacher, 0.9), expected)
    with pytest.raises(ValueError, match="teacher_logits"):
        update_center_(center, torch.randn(10, 5), 0.9)


def _dino_batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two steps of student logits (step, crop, sample, K), teacher logits and the initial center."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 5, generator=generator), torch.randn(2, 2, 8, 5, generator=generator), \
        torch.randn(1, 5, generator=generator)


def _two_steps_on_ranks(rank: int, world_size: int) -> dict[str, list[torch.Tensor]]:
    """Each rank: its rows of two steps; the gradient of its student logits is taken of ``loss / world_size``
    (what DDP's average of the ranks' gradients gives each rank's samples). Step 2 uses the center that step 1
    updated, so its loss and gradients depend on the center's all-reduce (step 1's do not: the loss is local)."""
    student, teacher, center = _dino_batches()
    rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    result: dict[str, list[torch.Tensor]] = {"loss": [], "grad": [], "centers": []}
    for step in range(2):
        logits = student[step][:, rows].clone().requires_grad_()
        loss = dino_loss(list(logits), list(teacher[step][:, rows]), center, 0.1, 0.04)
        (loss / world_size).backward()
        result["loss"].append(all_reduce_mean_(loss.detach().clone()))
        result["grad"].append(gather_no_grad(logits.grad.transpose(0, 1)).transpose(0, 1))  # samples in rank order
        update_center_(center, teacher[step][:, rows].reshape(-1, 5), 0.9)
        result["centers"].append(gather_no_grad(center))
    return result


def test_two_steps_on_two_processes_equal_one_process_on_the_full_batch() -> None:
    """Loss, gradients of the student logits and center, over two steps (the second with the first's center)."""
    result = run_distributed(_two_steps_on_ranks, 2)
    student, teacher, center = _dino_batches()
    centers = []
    for step in range(2):
        logits = student[step].clone().requires_grad_()
        loss = dino_loss(list(logits), list(teacher[step]), center, 0.1, 0.04)
        loss.backward()
        torch.testing.assert_close(result["grad"][step], logits.grad)
        torch.testing.assert_close(result["loss"][step], loss.detach())
        centers.append(torch.cat([update_center_(center, teacher[step].reshape(-1, 5), 0.9)] * 2))
    torch.testing.assert_close(result["centers"], centers)  # both ranks, the same center


def test_teacher_temperature_warms_up_linearly_then_stays() -> None:
    schedule = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(70, 0.07)])  # the reference code's table
    values = [teacher_temperature(epoch, 0.04, 0.07, 30) for epoch in range(100)]
    np.testing.assert_allclose(values, schedule, rtol=0, atol=1e-12)
    assert values[0] == 0.04 and values[29] == pytest.approx(0.07) and values[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07
