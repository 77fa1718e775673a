"""SupCon (Khosla et al. 2020): the loss against eq. 2 written as loops, NT-Xent when every label differs, 2 gloo
processes against one process on the full batch (labels gathered with the embeddings), and unlabelled data
refused with one line."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ssl_lightning.losses import nt_xent_loss, supcon_loss
from ssl_lightning.methods import SupCon
from tests.ddp_utils import as_one_process, run_distributed
from tests.tiny_methods import BACKBONE, one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

TEMPERATURE = 0.2


def supcon_by_loop(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2, L^sup_out: for each of the 2N views i, the mean over p in P(i) (same label, p != i) of
    -log exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t); then the mean over i."""
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    every_label = torch.cat([labels, labels]).tolist()
    total = 0.0
    for i in range(len(z)):
        denominator = sum(torch.exp(torch.dot(z[i], z[a]) / temperature) for a in range(len(z)) if a != i)
        positives = [p for p in range(len(z)) if p != i and every_label[p] == every_label[i]]
        total = total + sum(-torch.log(torch.exp(torch.dot(z[i], z[p]) / temperature) / denominator)
                            for p in positives) / len(positives)
    return total / len(z)


def test_loss_matches_equation_2_by_loops_in_value_and_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(2))
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    actual, expected = supcon_loss(z1, z2, labels, TEMPERATURE), supcon_by_loop(z1, z2, labels, TEMPERATURE)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(torch.autograd.grad(actual, (z1, z2)), torch.autograd.grad(expected, (z1, z2))):
        torch.testing.assert_close(got, want)


def test_with_every_label_different_it_is_nt_xent() -> None:
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    torch.testing.assert_close(supcon_loss(z1, z2, torch.arange(6), TEMPERATURE), nt_xent_loss(z1, z2, TEMPERATURE))
    assert supcon_loss(z1, z2, torch.zeros(6, dtype=torch.long), TEMPERATURE) != nt_xent_loss(z1, z2, TEMPERATURE)


def _loss_on_ranks(rank: int, world_size: int, z: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = slice(rank * z.shape[1] // world_size, (rank + 1) * z.shape[1] // world_size)
    z1, z2 = (z[v, rows].clone().requires_grad_(True) for v in range(2))
    loss = supcon_loss(z1, z2, labels[rows], TEMPERATURE)
    # a rank's rows also get the other ranks' gradients (the embeddings are gathered with gradient)
    mean, grads = as_one_process(loss, torch.autograd.grad(loss, (z1, z2)))
    return {"loss": mean, "grads": grads}


def test_two_processes_equal_one_process_on_the_full_batch() -> None:
    """Rank 0 and rank 1 hold images of the same classes: their positives cross ranks, through the gathered labels."""
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(2, 8, 5, dtype=torch.float64, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    two, one = run_distributed(_loss_on_ranks, 2, z, labels), _loss_on_ranks(0, 1, z, labels)
    torch.testing.assert_close(two["loss"], one["loss"])
    for got, want in zip(two["grads"], one["grads"]):
        torch.testing.assert_close(got, want)


def test_step_loss_is_the_loss_of_its_projections_and_labels() -> None:
    torch.manual_seed(0)
    model = SupCon(projection_hidden_dim=16, projection_dim=8, **BACKBONE)
    batch = fixed_views(8, 16)
    out, _ = run_training_step(model, batch)
    z1, z2 = model.projector(model(torch.cat(batch["views"]))).chunk(2)
    torch.testing.assert_close(out["loss"], supcon_by_loop(z1, z2, batch["label"], 0.1), rtol=1e-5, atol=1e-6)


def test_unlabelled_data_fails_with_one_line() -> None:
    model = SupCon(projection_hidden_dim=16, projection_dim=8, **BACKBONE)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=None))
    with pytest.raises(ValueError, match="SupCon needs labelled images: data SimpleNamespace has no labels") as error:
        model.setup("fit")
    assert "\n" not in str(error.value)
    model._trainer = SimpleNamespace(training=True)
    with pytest.raises(ValueError, match="unlabelled images"):  # on the host, before the batch moves
        model.on_before_batch_transfer({"label": torch.tensor([0, -1])}, 0)
    model.on_before_batch_transfer({"label": torch.tensor([0, 1])}, 0)
