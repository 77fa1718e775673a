"""Momentum (EMA) and queue callbacks: fused EMA against a loop, momentum schedules, queue wrapping,
2-process enqueue and shuffle-BN, one update per real optimizer step under gradient accumulation, and
bit-identical resume."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from ssl_lightning.callbacks import momentum as momentum_module
from ssl_lightning.callbacks.momentum import MomentumUpdate, ema_update_, scheduled_momentum
from ssl_lightning.callbacks.queue import QueueUpdate, enqueue_
from ssl_lightning.distributed import shuffle_across_ranks, unshuffle_across_ranks
from ssl_lightning.methods import BYOL, MoCoV2, MoCoV3
from tests.ddp_utils import run_distributed
from tests.tiny_methods import one_thread, tiny_data, tiny_method, tiny_trainer  # noqa: F401 (autouse fixture)


def test_ema_update_matches_a_loop_over_parameters() -> None:
    online = [torch.randn(3, 4), torch.randn(5)]
    target = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.9 * t + 0.1 * o for t, o in zip(target, online)]
    ema_update_(target, online, 0.9)
    for t, e in zip(target, expected):
        torch.testing.assert_close(t, e)
    before = [t.clone() for t in target]
    ema_update_(target, online, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(target, before))


def test_momentum_schedules() -> None:
    assert scheduled_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert scheduled_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert scheduled_momentum(100, 100, 0.996) == pytest.approx(1.0)
    values = [scheduled_momentum(k, 100, 0.99) for k in range(101)]
    assert values == sorted(values)
    assert scheduled_momentum(70, 100, 0.999, schedule="constant") == 0.999
    for k in range(0, 101, 10):  # I-JEPA's and MSN's code: 0.996 + k * (1 - 0.996) / K
        assert scheduled_momentum(k, 100, 0.996, schedule="linear") == pytest.approx(0.996 + k * 0.004 / 100)
    assert scheduled_momentum(150, 100, 0.996, 0.9992, schedule="linear") == pytest.approx(0.9992)
    with pytest.raises(ValueError, match="'step'; use 'cosine', 'linear' or 'constant'"):
        scheduled_momentum(0, 1, 0.9, schedule="step")  # type: ignore[arg-type]


def test_enqueue_wraps_and_keeps_the_newest_keys() -> None:
    queue, pointer = torch.zeros(5, 2), torch.zeros((), dtype=torch.long)
    keys = torch.arange(1.0, 15.0).view(7, 2)
    enqueue_(queue, pointer, keys[:3])
    assert pointer.item() == 3 and torch.equal(queue[:3], keys[:3])
    enqueue_(queue, pointer, keys[3:6])  # wraps: rows 3, 4 then 0
    assert pointer.item() == 1
    assert torch.equal(queue, torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    enqueue_(queue, pointer, keys)  # 7 keys into 5 rows: the newest 5, as if written one by one
    assert pointer.item() == (1 + 7) % 5
    assert torch.equal(queue, torch.stack([keys[4], keys[5], keys[6], keys[2], keys[3]]))


class _RecordsKeys(MoCoV2):
    """Keeps, for each micro-batch, the keys its training step returns and the queue it was compared with."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        queue = self.queue.clone()
        output = super().training_step(batch, batch_idx)
        self.seen.append((output["keys"].clone(), queue))
        return output


def test_queue_receives_every_micro_batch_of_a_step_together(tmp_path: Path) -> None:
    """Accumulating 2 micro-batches of 8 is one step of 16: both micro-batches meet the queue of before the
    step, and after it the queue holds both micro-batches' keys in order (written one by one into a ring of
    24 rows here, the second step wrapping around) with the pointer moved by 16."""
    model = tiny_method(_RecordsKeys)
    initial = model.queue.clone()
    trainer = tiny_trainer(tmp_path, max_steps=2, accumulate=2)
    trainer.fit(model, tiny_data())  # 4 batches of 8: 2 steps
    assert trainer.global_step == 2 and len(model.seen) == 4
    expected, pointer = initial.clone(), 0
    for step in range(2):
        for micro in (2 * step, 2 * step + 1):
            keys, queue = model.seen[micro]
            assert torch.equal(queue, expected), f"micro-batch {micro} saw a queue changed within its step"
        for micro in (2 * step, 2 * step + 1):
            for key in model.seen[micro][0]:
                expected[pointer] = key
                pointer = (pointer + 1) % len(expected)
    assert torch.equal(model.queue, expected) and model.queue_ptr.item() == pointer == (2 * 16) % 24


def _ddp_queue_and_shuffle(rank: int, world_size: int, keys: torch.Tensor, x: torch.Tensor) -> dict:
    """Enqueue: each rank returns keys[rank] from its training step and the callback enqueues after the
    step. Shuffle-BN: each rank shuffles its shard of x (each rank's own generator: rank 0's draw wins)."""
    module = nn.Module()
    module.register_buffer("queue", torch.zeros(10, 3))
    module.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
    callback, trainer = QueueUpdate(), SimpleNamespace(global_step=0)
    callback.on_train_start(trainer, module)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, {"keys": keys[rank]}, None, 0)

    local = x.chunk(world_size)[rank]
    shuffled, unshuffle = shuffle_across_ranks(local, torch.Generator().manual_seed(rank))
    restored = unshuffle_across_ranks(shuffled * 10, unshuffle)

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros_like(tensor) for _ in range(world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts)

    return {"queues": gather(module.queue), "pointer": module.queue_ptr, "slices": gather(shuffled).flatten(0, 1),
            "restored": gather(restored).flatten(0, 1)}


def _on_two_processes(rank: int, world_size: int, keys: torch.Tensor, x: torch.Tensor, images: torch.Tensor) -> dict:
    return {**_ddp_queue_and_shuffle(rank, world_size, keys, x), "moco": _moco_keys_with_shuffle_bn(rank, world_size, images)}


@pytest.fixture(scope="module")
def two_processes() -> dict:
    """One start of 2 gloo processes for the queue, shuffle and MoCo v2 shuffle-BN checks (a start costs seconds)."""
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "keys": torch.randn(2, 4, 3, generator=generator),  # (rank, local batch, dim)
        "x": torch.arange(16.0).view(8, 2),  # the global batch of shuffle-BN
        "images": torch.randn(8, 3, 16, 16, generator=generator),  # MoCo v2's global batch of second views
    }
    return {**inputs, "result": run_distributed(_on_two_processes, 2, inputs["keys"], inputs["x"], inputs["images"])}


def test_queue_and_shuffle_bn_across_two_processes(two_processes: dict) -> None:
    keys, x, result = two_processes["keys"], two_processes["x"], two_processes["result"]

    # the queue receives the keys of both ranks, in rank order, on both ranks
    expected = torch.cat([keys[0], keys[1], torch.zeros(2, 3)])
    assert torch.equal(result["queues"][0], expected) and torch.equal(result["queues"][1], expected)
    assert result["pointer"].item() == 8

    # shuffle-BN: each rank encodes a slice of one permutation of the global batch; unshuffle brings
    # every row back to the rank and position of its sample
    slices = result["slices"]
    assert torch.equal(slices[slices[:, 0].argsort()], x) and not torch.equal(slices, x)
    assert torch.equal(result["restored"], x * 10)


def _moco_keys_with_shuffle_bn(rank: int, world_size: int, images: torch.Tensor) -> dict:
    """Each rank has its shard of ``images``; ``MoCoV2.encode_keys`` shuffles, encodes and unshuffles. Rank 0
    also returns what the key encoder received on each rank, and reference keys it computes itself."""
    model = tiny_method(MoCoV2)  # same seed: the same weights on both ranks; train mode: batch statistics
    received: list[torch.Tensor] = []
    hook = model.key_backbone.register_forward_hook(lambda module, args, out: received.append(args[0].clone()))
    keys = model.encode_keys(images.chunk(world_size)[rank], batch_idx=3)
    hook.remove()

    def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.zeros_like(tensor) for _ in range(world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return parts

    slices = gather(received[0])
    with torch.no_grad():  # the key encoder by hand on each rank's slice, and on each rank's own unshuffled shard
        encode = lambda x: torch.nn.functional.normalize(model.key_projector(model.key_backbone(x)), dim=1)  # noqa: E731
        by_hand = [encode(s) for s in slices]
        unshuffled = [encode(shard) for shard in images.chunk(world_size)]
    return {"keys": torch.cat(gather(keys)), "slices": torch.cat(slices), "by_hand": torch.cat(by_hand),
            "unshuffled": torch.cat(unshuffled)}


def test_moco_v2_shuffle_bn_gives_each_key_back_to_its_sample(two_processes: dict) -> None:
    """On 2 processes the key encoder's BatchNorm sees a shuffled split of the global batch; every key
    returned must be the one computed from its own sample within that split."""
    images, result = two_processes["images"], two_processes["result"]["moco"]
    slices = result["slices"]  # the shuffled global batch, rank 0's slice first
    source = [next(j for j in range(8) if torch.equal(row, images[j])) for row in slices]
    assert sorted(source) == list(range(8)), "the slices are not a permutation of the global batch"
    assert set(source[:4]) != {0, 1, 2, 3}, "the shuffle kept every sample on its own rank"
    expected = torch.empty_like(result["by_hand"])
    expected[source] = result["by_hand"]  # row i of the shuffled batch belongs to sample source[i]
    torch.testing.assert_close(result["keys"], expected, rtol=1e-5, atol=1e-6)
    assert (result["keys"] - result["unshuffled"]).abs().max() > 1e-3, "shuffle-BN changed no key"


def test_shuffle_bn_is_a_no_op_on_one_process() -> None:
    x = torch.randn(4, 2)
    same, unshuffle = shuffle_across_ranks(x, torch.Generator())
    assert same is x and unshuffle is None and unshuffle_across_ranks(x, None) is x


class _RecordMomentum:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.values: list[float] = []
        original = momentum_module.ema_update_

        def record(targets, onlines, momentum):  # type: ignore[no-untyped-def]
            self.values.append(momentum)
            original(targets, onlines, momentum)

        monkeypatch.setattr(momentum_module, "ema_update_", record)


def test_one_update_per_optimizer_step_under_accumulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = _RecordMomentum(monkeypatch)
    model = tiny_method(BYOL)
    target_before = [p.clone() for p in model.target_backbone.parameters()]
    trainer = tiny_trainer(tmp_path, max_steps=5, accumulate=4)  # no MomentumUpdate given: the method adds it
    trainer.fit(model, tiny_data(num_samples=64))  # 8 batches per epoch: 2 steps per epoch
    assert trainer.global_step == 5 and sum(isinstance(c, MomentumUpdate) for c in trainer.callbacks) == 1
    assert record.values == [scheduled_momentum(k, 5, 0.9) for k in range(5)]
    assert not all(torch.equal(p, b) for p, b in zip(model.target_backbone.parameters(), target_before))


def test_a_linear_schedule_reaches_the_ema_through_the_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``momentum_schedule: linear`` (I-JEPA's and MSN's code): 0.9 + (1 - 0.9) k / K at optimizer step k."""
    record = _RecordMomentum(monkeypatch)
    trainer = tiny_trainer(tmp_path, max_steps=4)
    trainer.fit(tiny_method(BYOL, momentum_schedule="linear"), tiny_data())
    assert record.values == pytest.approx([0.9 + 0.1 * k / 4 for k in range(4)])


class _SkipsSecondStep(BYOL):
    """Runs the closure (forward, backward) but not the optimizer step at step 1, as a GradScaler does
    when it finds inf/NaN gradients."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:  # type: ignore[no-untyped-def]
        if self.global_step == 1:
            optimizer_closure()
        else:
            optimizer.step(closure=optimizer_closure)


def test_no_update_after_a_skipped_optimizer_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = _RecordMomentum(monkeypatch)
    model = tiny_method(_SkipsSecondStep)
    trainer = tiny_trainer(tmp_path, max_steps=4, accumulate=2)
    trainer.fit(model, tiny_data())
    assert trainer.global_step == 4
    assert record.values == [scheduled_momentum(k, 4, 0.9) for k in (0, 2, 3)]


@pytest.mark.parametrize(
    ("cls", "accumulate", "stop_at", "total"),
    [(MoCoV2, 1, 6, 9), (MoCoV2, 2, 3, 5), (BYOL, 2, 3, 5), (MoCoV3, 2, 2, 4)],
    ids=["mocov2", "mocov2-accumulate", "byol-accumulate", "mocov3-accumulate-epoch-end"],
)
def test_resume_is_bit_identical(cls: type, accumulate: int, stop_at: int, total: int, tmp_path: Path) -> None:
    """4 batches per epoch; a checkpoint after ``stop_at`` optimizer steps (mid-epoch except for the last
    case), resumed to ``total``, ends where the uninterrupted run does: weights, targets, queue, pointer."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=stop_at, save_top_k=-1)
    model = tiny_method(cls)
    tiny_trainer(tmp_path, total, accumulate, [checkpoint]).fit(model, tiny_data())
    resumed = tiny_method(cls, seed=1)  # different initial weights: all must come from the checkpoint
    trainer = tiny_trainer(tmp_path, total, accumulate)
    trainer.fit(resumed, tiny_data(), ckpt_path=tmp_path / f"step={stop_at}.ckpt")
    assert trainer.global_step == total
    expected, actual = model.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"differ after resume: {different}"
    targets = [name for name in expected if name.startswith(("key_", "target_", "momentum_"))]
    assert targets and (cls is not MoCoV2 or {"queue", "queue_ptr"} <= expected.keys())
