"""DeepCluster-v2 (Caron et al. 2020, appendix): spherical k-means and the loss against loops, k-means and the loss
on 2 gloo processes against one process on everything, the step's wiring (targets looked up by index, the bank
written), clustering once per epoch, the first bank, and one-line errors for a batch without index, a bank that
does not fit the data and more prototypes than images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.losses.deepcluster import deepcluster_loss
from ssl_lightning.methods import DeepClusterV2
from ssl_lightning.nn.kmeans import nearest_centroids, spherical_kmeans
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests import ddp_deepcluster_v2
from tests.ddp_utils import as_one_process, run_distributed
from tests.tiny_methods import BACKBONE, one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

TEMPERATURE = 0.1
SMALL = {**BACKBONE, "projection_hidden_dim": 16, "projection_dim": 8, "num_prototypes": [3, 5],
         "kmeans_iterations": 3}


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)), dim=1)


def kmeans_by_loop(points: torch.Tensor, centroids: torch.Tensor, iterations: int) -> tuple[torch.Tensor, list[int]]:
    """Nearest centroid by cosine, centroid = normalized mean of its members; a centroid without members stays."""
    centroids = [c.clone() for c in centroids]

    def nearest(p: torch.Tensor) -> int:
        cosines = [float(torch.dot(p, c) / (p.norm() * c.norm())) for c in centroids]
        return max(range(len(cosines)), key=cosines.__getitem__)

    for _ in range(iterations):
        members = [nearest(p) for p in points]
        for k in range(len(centroids)):
            mine = [p for p, m in zip(points, members) if m == k]
            if mine:
                mean = sum(mine) / len(mine)
                centroids[k] = mean / mean.norm()
    return torch.stack(centroids), [nearest(p) for p in points]


def loss_by_loop(scores: list[list[torch.Tensor]], targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over heads h, crops v, images i of -log softmax(s_hvi / t)[target_hi]."""
    head_losses = []
    for h, head in enumerate(scores):
        crop_losses = []
        for crop in head:
            total = 0.0
            for i, row in enumerate(crop):
                total = total - (row[targets[h, i]] / temperature - torch.log(torch.exp(row / temperature).sum()))
            crop_losses.append(total / len(crop))
        head_losses.append(sum(crop_losses) / len(crop_losses))
    return sum(head_losses) / len(head_losses)


def test_kmeans_matches_the_loop_with_an_empty_cluster() -> None:
    points = F.normalize(unit_rows(40, 5, 0) + 2 * torch.eye(5, dtype=torch.float64)[0], dim=1)  # around +e1
    init = torch.cat([points[:3], -torch.eye(5, dtype=torch.float64)[:1]])  # centroid 3 = -e1: no member ever
    centroids, assigned = spherical_kmeans(points, init, iterations=4)
    expected_centroids, expected_assigned = kmeans_by_loop(points, init, 4)
    torch.testing.assert_close(centroids, expected_centroids)
    assert assigned.tolist() == expected_assigned and len(set(expected_assigned)) == 3
    assert torch.equal(centroids[3], init[3])  # empty: kept where it was


def test_nearest_centroids_in_chunks_equals_one_product() -> None:
    points, centroids = unit_rows(50, 6, 1), unit_rows(7, 6, 2)
    assert torch.equal(nearest_centroids(points, centroids, chunk_size=8), (points @ centroids.T).argmax(1))


def test_loss_matches_the_loop_with_gradients() -> None:
    generator = torch.Generator().manual_seed(3)
    scores = [[torch.randn(6, k, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(3)]
              for k in (4, 7)]
    targets = torch.stack([torch.randint(0, 4, (6,), generator=generator), torch.randint(0, 7, (6,), generator=generator)])
    actual, expected = deepcluster_loss(scores, targets, TEMPERATURE), loss_by_loop(scores, targets, TEMPERATURE)
    torch.testing.assert_close(actual.double(), expected)
    flat = [s for head in scores for s in head]
    for got, want in zip(torch.autograd.grad(actual, flat), torch.autograd.grad(expected, flat)):
        torch.testing.assert_close(got, want.float().double(), rtol=1e-4, atol=1e-6)


def _on_ranks(rank: int, world_size: int, bank: torch.Tensor, init: torch.Tensor, z: torch.Tensor,
              prototypes: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    torch.set_num_threads(1)
    mine = torch.tensor_split(torch.arange(bank.shape[0]), world_size)[rank]
    centroids, assigned = spherical_kmeans(bank[mine], init, iterations=5)
    rows = torch.tensor_split(torch.arange(z.shape[1]), world_size)[rank]
    crops = [z[v, rows].clone().requires_grad_(True) for v in range(z.shape[0])]
    loss = deepcluster_loss([[c @ prototypes.T for c in crops]], targets[:, rows], TEMPERATURE)
    mean, grads = as_one_process(loss, torch.autograd.grad(loss, crops))
    model = DeepClusterV2(**{**SMALL, "dataset_size": bank.shape[0], "projection_dim": bank.shape[1]})
    model.memory_bank.copy_(torch.stack([bank, bank.flip(0)]).float())
    model.cluster_memory_bank()  # the method's own split of the bank and gather of the table
    table = torch.cat([model.assignments.flatten(), *[head.weight.flatten() for head in model.prototypes]])
    every_rank = [(centroids, table)]
    if world_size > 1:  # every rank's centroids, table and prototypes, to check they agree
        every_rank = []
        for mine in (centroids, table):
            parts = [torch.zeros_like(mine) for _ in range(world_size)]
            torch.distributed.all_gather(parts, mine)
            every_rank.append(parts)
        every_rank = list(zip(*every_rank))
        sizes = [len(s) for s in torch.tensor_split(torch.arange(bank.shape[0]), world_size)]
        padded = [torch.zeros(max(sizes), dtype=torch.long) for _ in range(world_size)]
        torch.distributed.all_gather(padded, F.pad(assigned, (0, max(sizes) - len(assigned))))
        assigned = torch.cat([p[:n] for p, n in zip(padded, sizes)])
    return {"every_rank": every_rank, "assigned": assigned, "loss": mean, "grads": grads}


def test_two_processes_equal_one_process() -> None:
    """k-means over two ranks' halves of a bank = one process on the whole bank (the same centroids on both ranks),
    also through the method (its assignment table and prototypes the same on both ranks); the loss and its
    gradients over two halves of a batch = one process on the full batch."""
    generator = torch.Generator().manual_seed(4)
    bank = unit_rows(41, 6, 5)
    init = bank[torch.randperm(41, generator=generator)[:5]]
    z = F.normalize(torch.randn(2, 8, 6, generator=generator), dim=2)
    prototypes = F.normalize(torch.randn(4, 6, generator=generator), dim=1)
    targets = torch.randint(0, 4, (1, 8), generator=generator)
    two = run_distributed(_on_ranks, 2, bank, init, z, prototypes, targets)
    one = _on_ranks(0, 1, bank, init, z, prototypes, targets)
    (centroids, table), = one["every_rank"]
    for got_centroids, got_table in two["every_rank"]:
        torch.testing.assert_close(got_centroids, centroids)
        torch.testing.assert_close(got_table, table)
    assert torch.equal(two["assigned"], one["assigned"])
    torch.testing.assert_close(two["loss"], one["loss"])
    for got, want in zip(two["grads"], one["grads"]):
        torch.testing.assert_close(got, want)


def test_step_predicts_each_images_cluster_and_writes_the_bank() -> None:
    torch.manual_seed(0)
    model = DeepClusterV2(dataset_size=20, crops_for_assign=[1], **SMALL)
    model.assignments.copy_(torch.stack([torch.arange(20) % 3, torch.arange(20) % 5]))
    batch = {**fixed_views(4, 16, num_local=1, local_size=8), "index": torch.tensor([7, 2, 19, 11])}
    out, logged = run_training_step(model, batch)
    views = batch["views"]
    z = [F.normalize(model.projector(torch.cat([model(torch.cat(views[:2])), model(views[2])])), dim=1).chunk(3)][0]
    scores = [[c @ head.weight.T for c in z] for head in model.prototypes]
    expected = loss_by_loop(scores, model.assignments[:, batch["index"]], TEMPERATURE)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.memory_bank[0, batch["index"]], z[1].detach(), rtol=1e-5, atol=1e-6)
    assert model.memory_bank[0, [0, 1, 3]].abs().sum() == 0 and logged["train/loss"] == out["loss"]


def test_clustering_sets_the_prototypes_and_runs_once_per_epoch() -> None:
    model = DeepClusterV2(dataset_size=30, **SMALL)
    model.memory_bank.copy_(torch.stack([unit_rows(30, 8, 6), unit_rows(30, 8, 7)]).float())
    model.clustered_epoch.fill_(0)
    model._trainer = SimpleNamespace(current_epoch=1)
    model.on_train_epoch_start()
    for h, head in enumerate(model.prototypes):
        bank = model.memory_bank[h % 2]
        assert torch.equal(model.assignments[h], (bank @ head.weight.T).argmax(1))
        assert torch.allclose(head.weight.norm(dim=1), torch.ones(head.out_features))
    first = model.assignments.clone()
    model.memory_bank.copy_(-model.memory_bank)
    model.on_train_epoch_start()  # resumed in the same epoch: the saved assignments stay
    assert int(model.clustered_epoch) == 1 and torch.equal(model.assignments, first)


def test_a_batch_without_index_fails_with_one_line() -> None:
    model = DeepClusterV2(dataset_size=8, **SMALL)
    with pytest.raises(ValueError, match=r"needs batch\['index'\]") as error:
        run_training_step(model, fixed_views(4, 16))
    assert "\n" not in str(error.value)


def test_settings_and_checkpoints_that_do_not_fit_the_data_fail_with_one_line() -> None:
    data = SimpleNamespace(num_train_items=32)
    model = DeepClusterV2(dataset_size=50, **SMALL)
    model._trainer = SimpleNamespace(datamodule=data)
    with pytest.raises(ValueError, match=r"dataset_size=50 but the training data holds 32 images; set "
                                         r"model.init_args.dataset_size: 32") as error:
        model.setup("fit")
    assert "\n" not in str(error.value)
    model = DeepClusterV2(**{**SMALL, "num_prototypes": [8, 40]})
    model._trainer = SimpleNamespace(datamodule=data)
    with pytest.raises(ValueError, match=r"num_prototypes=\[8, 40\] asks for more clusters than the 32 training") as error:
        model.setup("fit")
    assert "\n" not in str(error.value)
    model = DeepClusterV2(**SMALL)
    model._trainer = SimpleNamespace(datamodule=data)
    model.setup("fit")
    assert model.memory_bank.shape == (2, 32, 8) and model.assignments.shape == (2, 32)
    assert model.hparams["dataset_size"] == 32  # a checkpoint rebuilds buffers of this size
    model._trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(ValueError, match=r"trains from an ssl_lightning datamodule .* got NoneType") as error:
        model.setup("fit")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"the checkpoint's memory bank holds 20 images, this run's training data "
                                         r"32; resume on the data it was trained on"):
        model.on_load_checkpoint({"state_dict": {"memory_bank": torch.zeros(2, 20, 8)}})


def test_a_short_fit_fills_the_bank_first_and_loads_back(tmp_path: Path) -> None:
    """Two epochs: the first bank holds every image's embedding before the first step (no row left empty), the
    assignments cover every image, and ``load_from_checkpoint`` rebuilds the buffers of the data's size."""
    seed_everything(0, verbose=False)
    model = DeepClusterV2(**SMALL, optim=OptimConfig(name="sgd", lr=0.1, warmup_epochs=0))
    data = SyntheticData(num_samples=24, batch_size=8, image_size=16, num_workers=0, seed=0,
                         views=SimCLRViews(16, num_local=1, local_size=8))
    first_banks: list[torch.Tensor] = []
    original = model.cluster_memory_bank

    def record() -> None:
        first_banks.append(model.memory_bank.clone())
        original()

    model.cluster_memory_bank = record  # type: ignore[method-assign]
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert len(first_banks) == 2 and (first_banks[0].norm(dim=2) > 0.99).all()
    assert torch.equal(first_banks[0][0], first_banks[0][1])  # one embedding per image in the first bank
    assert (model.assignments >= 0).all() and int(model.clustered_epoch) == 1
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = DeepClusterV2.load_from_checkpoint(path)
    assert torch.equal(loaded.memory_bank, model.memory_bank) and torch.equal(loaded.assignments, model.assignments)


def test_lightning_ddp_keeps_the_bank_and_the_table_the_same_on_every_rank(tmp_path: Path) -> None:
    """Two DDP processes, two epochs: the first bank (every image once, before the first step) equals one
    process's; at the end both ranks hold the same bank, assignment table and prototypes without DDP broadcasting the
    bank or the table, and every row of the bank was rewritten by training (each rank writes the rows of both)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.ddp_deepcluster_v2", str(tmp_path)], cwd=root,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:  # the one-process reference runs while the DDP processes start
            first_bank = ddp_deepcluster_v2.first_bank_one_process()
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, (tmp_path / "log.txt").read_text()[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(ranks[0]["banks_clustered"][0], first_bank, rtol=1e-4, atol=1e-5)
    for key in ("banks_clustered", "memory_bank", "assignments", "prototypes"):
        for got, want in zip(ranks[1][key], ranks[0][key]):
            assert torch.equal(got, want), key
    assert len(ranks[0]["banks_clustered"]) == 2 and (ranks[0]["assignments"] >= 0).all()
    assert ranks[0]["not_broadcast"] == ["assignments", "memory_bank"]  # the ranks kept them equal themselves
    assert ((ranks[0]["memory_bank"] - ranks[0]["banks_clustered"][0]).norm(dim=2) > 1e-4).all()
