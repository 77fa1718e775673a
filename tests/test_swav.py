"""SwAV: Sinkhorn-Knopp against the paper's algorithm written as loops, its marginals, 2 processes against
one, the swapped prediction against a loop over crop pairs, prototypes (unit norm, frozen at the start),
the queue (used from its epoch, once filled) and a bit-identical resume with the queue in use."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_lightning.callbacks import QueueUpdate
from ssl_lightning.losses import sinkhorn_knopp, swav_loss
from ssl_lightning.methods import SwAV
from ssl_lightning.methods import swav as swav_module
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests.ddp_utils import run_distributed
from tests.tiny_methods import BACKBONE, one_thread, tiny_data, tiny_trainer  # noqa: F401 (autouse fixture)

MULTI_CROP = SimCLRViews(size=16, scale=(0.14, 1.0), num_local=2, local_size=8, local_scale=(0.1, 0.4))


def random_scores(b: int, k: int, seed: int = 0) -> torch.Tensor:
    """Cosine similarities of normalized embeddings and prototypes, as SwAV computes them."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, 6, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 6, generator=g), dim=1)
    return z @ c.T


def slow_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The paper's algorithm (appendix A.1, ``distributed_sinkhorn``) with explicit loops, in float64:
    Q = exp(C^T Z / eps) as a K x B matrix scaled to sum 1, then alternately every row (prototype) to 1/K
    and every column (sample) to 1/B; finally the columns times B, returned as B x K."""
    b, k = scores.shape
    q = [[math.exp(float(scores[j, i]) / epsilon) for j in range(b)] for i in range(k)]
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for i in range(k):
            row_sum = sum(q[i])
            q[i] = [x / row_sum / k for x in q[i]]
        for j in range(b):
            col_sum = sum(q[i][j] for i in range(k))
            for i in range(k):
                q[i][j] = q[i][j] / col_sum / b
    return torch.tensor([[q[i][j] * b for i in range(k)] for j in range(b)], dtype=torch.float64)


@pytest.mark.parametrize(
    "shift, epsilon, iterations", [(0, 0.05, 3), (0, 0.5, 1), (4, 0.05, 3)], ids=["paper", "one-iteration", "large"]
)
def test_sinkhorn_matches_the_papers_algorithm(shift: float, epsilon: float, iterations: int) -> None:
    scores = random_scores(12, 5) + shift
    codes = sinkhorn_knopp(scores, epsilon, iterations)
    assert codes.dtype == torch.float32 and codes.shape == (12, 5) and torch.isfinite(codes).all()
    torch.testing.assert_close(codes.double(), slow_sinkhorn(scores, epsilon, iterations), rtol=1e-4, atol=1e-6)
    if shift:  # exp(scores / epsilon) overflows float32 here: the global maximum is taken out first
        assert torch.isinf(torch.exp(scores / epsilon)).any()


def test_codes_are_assignments_and_prototypes_share_the_batch() -> None:
    b, k = 24, 6
    scores = random_scores(b, k, seed=1)
    for iterations in (3, 100):
        codes = sinkhorn_knopp(scores, 0.05, iterations)
        assert (codes >= 0).all()
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(b))  # each sample's code sums to 1
    # at convergence each prototype gets B/K of the batch; the paper's 3 iterations move towards it
    torch.testing.assert_close(sinkhorn_knopp(scores, 0.05, 100).sum(dim=0), torch.full((k,), b / k), rtol=1e-3, atol=0)
    three = sinkhorn_knopp(scores, 0.05, 3).sum(dim=0)
    raw = F.softmax(scores / 0.05, dim=1).sum(dim=0)  # the codes without equipartition
    assert (three - b / k).abs().sum() < (raw - b / k).abs().sum()


def test_sinkhorn_and_loss_reject_bad_shapes_by_name() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        sinkhorn_knopp(torch.zeros(3), 0.05, 3)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(3, 2), 0.0, 3)
    scores = [torch.zeros(4, 3)] * 3
    with pytest.raises(ValueError, match="crops_for_assign"):
        swav_loss(scores, [torch.zeros(4, 3)], [3])
    with pytest.raises(ValueError, match="one code per assignment crop"):
        swav_loss(scores, [torch.zeros(4, 3)], [0, 1])
    with pytest.raises(ValueError, match=r"one shape \(B, K\)"):
        swav_loss(scores, [torch.zeros(4, 2)], [0])


def method_with_a_full_queue(queue: torch.Tensor, pointer: int) -> SwAV:
    """A SwAV whose queue (8, 2 crops, 6) is in use, without a trainer; the same weights in every process."""
    model = tiny_swav(projection_dim=6, num_prototypes=5, queue_length=8)
    model.queue.copy_(queue)
    model.queue_ptr.fill_(pointer)
    model.used_queue_length = lambda: 8  # type: ignore[method-assign]
    return model


def _gather_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    padded = torch.cat([rows, rows.new_zeros(max(counts) - rows.shape[0], rows.shape[1])])
    parts = [torch.zeros_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def _ddp_codes(rank: int, world_size: int, batch: torch.Tensor, queue: torch.Tensor, embeddings: torch.Tensor) -> dict:
    """Rank 0 holds 5 samples, rank 1 holds 3. Sinkhorn-Knopp with each rank's slice of a queue of scores,
    and ``SwAV.codes`` with the method's own queue of embeddings (its slice chosen by the method)."""
    counts = [5, 3]
    mine = batch[:5] if rank == 0 else batch[5:]
    own_queue = torch.tensor_split(queue, world_size)[rank]
    codes = sinkhorn_knopp(torch.cat([mine, own_queue]), 0.05, 3)[: mine.shape[0]]
    model = method_with_a_full_queue(embeddings, pointer=3)
    method_codes = model.codes(mine, crop=1)
    return {"codes": _gather_rows(codes, counts), "method_codes": _gather_rows(method_codes, counts)}


def test_codes_on_two_processes_equal_one_process_on_the_full_batch() -> None:
    batch, queue = random_scores(8, 5, seed=2), random_scores(7, 5, seed=3)
    embeddings = F.normalize(torch.randn(8, 2, 6), dim=2)
    result = run_distributed(_ddp_codes, 2, batch, queue, embeddings)
    expected = sinkhorn_knopp(torch.cat([batch, queue]), 0.05, 3)[:8]
    torch.testing.assert_close(result["codes"], expected, rtol=1e-5, atol=1e-7)

    model = method_with_a_full_queue(embeddings, pointer=3)  # one process: the whole queue
    queue_scores = model.prototypes(embeddings[:, 1]).detach()
    expected = sinkhorn_knopp(torch.cat([batch, queue_scores]), 0.05, 3)[:8]
    torch.testing.assert_close(model.codes(batch, crop=1), expected)
    torch.testing.assert_close(result["method_codes"], expected, rtol=1e-5, atol=1e-7)


def slow_swav_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], assign: list[int], temperature: float) -> torch.Tensor:
    """Eq. 1-2 summed by hand: for each assignment crop s and every other crop t, the mean over samples of
    -sum_k q_s[k] log(exp(z_t . c_k / T) / sum_k' exp(z_t . c_k' / T)); averaged over t, then over s."""
    total = torch.zeros((), dtype=torch.float64)
    for code, s in zip(codes, assign):
        others = [t for t in range(len(scores)) if t != s]
        for t in others:
            for j in range(code.shape[0]):
                logits = scores[t][j].double() / temperature
                log_norm = torch.log(sum(torch.exp(logits[k]) for k in range(logits.shape[0])))
                term = -sum(code[j, k].double() * (logits[k] - log_norm) for k in range(logits.shape[0]))
                total = total + term / code.shape[0] / len(others)
    return total / len(assign)


def test_swapped_prediction_matches_a_loop_over_crop_pairs() -> None:
    views, assign, temperature = 4, [0, 2], 0.1
    scores = [random_scores(5, 7, seed=10 + v).requires_grad_() for v in range(views)]
    codes = [sinkhorn_knopp(scores[i].detach(), 0.05, 3) for i in assign]
    loss = swav_loss(scores, codes, assign, temperature)
    expected = slow_swav_loss(scores, codes, assign, temperature)
    torch.testing.assert_close(loss.double(), expected)
    grads = torch.autograd.grad(loss, scores)
    expected_grads = torch.autograd.grad(expected, scores)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in grads)  # every crop predicts, the assignment crops too


def tiny_swav(seed: int = 0, **kwargs: Any) -> SwAV:
    seed_everything(seed, verbose=False)
    heads = dict(projection_hidden_dim=32, projection_dim=16, num_prototypes=10, freeze_prototypes_steps=0)
    return SwAV(**{**BACKBONE, **heads, "optim": OptimConfig(name="sgd", lr=0.5, warmup_epochs=1), **kwargs})


class RecordPrototypes(Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.weights.append(pl_module.prototypes.weight.detach().clone())


def test_prototypes_stay_unit_norm_and_do_not_move_while_frozen(tmp_path: Path) -> None:
    model = tiny_swav(freeze_prototypes_steps=2)
    initial = model.prototypes.weight.detach().clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(10))
    record = RecordPrototypes()
    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[record])
    trainer.fit(model, tiny_data(views=MULTI_CROP))
    assert len(record.weights) == 4 and not any(isinstance(c, QueueUpdate) for c in trainer.callbacks)
    for weights in record.weights:
        torch.testing.assert_close(weights.norm(dim=1), torch.ones(10))
    for frozen in record.weights[:2]:  # after optimizer steps 0 and 1
        torch.testing.assert_close(frozen, initial, rtol=0, atol=1e-6)
    assert not torch.allclose(record.weights[2], initial, rtol=0, atol=1e-3)  # step 2 moves them
    assert not torch.allclose(record.weights[3], record.weights[2], rtol=0, atol=1e-3)


class RecordSinkhornRows:
    """Replaces ``sinkhorn_knopp`` in the method to record how many rows (batch + queue) each call gets."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: list[int] = []

        def record(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
            self.rows.append(scores.shape[0])
            return sinkhorn_knopp(scores, epsilon, iterations)

        monkeypatch.setattr(swav_module, "sinkhorn_knopp", record)


class RecordKeys(Callback):
    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.keys.append(outputs["keys"])


def test_queue_from_its_epoch_once_filled_and_a_resume_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 batches of 8 per epoch, 2 assignment crops, a queue of 16 from epoch 1. A checkpoint at step 5
    (epoch 1, queue in use) resumed to step 7 ends where the uninterrupted run does."""
    spy, keys = RecordSinkhornRows(monkeypatch), RecordKeys()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    model = tiny_swav(queue_length=16, queue_start_epoch=1)
    assert model.queue.shape == (16, 2, 16)
    tiny_trainer(tmp_path, max_steps=7, callbacks=[checkpoint, keys]).fit(model, tiny_data(views=MULTI_CROP))
    assert spy.rows == [8] * 8 + [8 + 16] * 6  # two codes per step: epoch 0 without the queue, then with it
    recent = (model.queue_ptr - 16 + torch.arange(16)) % 16
    torch.testing.assert_close(model.queue[recent], torch.cat(keys.keys[-2:]), rtol=0, atol=0)
    torch.testing.assert_close(model.queue.norm(dim=2), torch.ones(16, 2))  # normalized embeddings

    spy.rows.clear()  # resume with other initial weights: everything must come from the checkpoint
    resumed = tiny_swav(seed=1, queue_length=16, queue_start_epoch=1)
    trainer = tiny_trainer(tmp_path, max_steps=7)
    trainer.fit(resumed, tiny_data(views=MULTI_CROP), ckpt_path=tmp_path / "step=5.ckpt")
    assert trainer.global_step == 7 and spy.rows == [8 + 16] * 4  # the restored queue is used at once
    expected, actual = model.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys() and {"queue", "queue_ptr", "prototypes.weight"} <= expected.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"differ after resume: {different}"


def test_queue_waits_until_filled_and_bad_views_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = RecordSinkhornRows(monkeypatch)
    model = tiny_swav(queue_length=16, queue_start_epoch=0, crops_for_assign=[0])
    tiny_trainer(tmp_path, max_steps=4).fit(model, tiny_data())  # two views, 8 per batch
    assert spy.rows == [8, 8, 8 + 16, 8 + 16]  # filled by 2 steps of 8
    with pytest.raises(ValueError, match=r"batch\['views'\] with 1"):
        model.training_step({"views": [torch.zeros(2, 3, 16, 16)]}, 0)
    with pytest.raises(ValueError, match="crops_for_assign"):
        tiny_swav(crops_for_assign=[0, 0])
