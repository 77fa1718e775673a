"""DCL and DCLW (Yeh et al. 2022) against the paper's formulas written as loops over anchors, for SimCLR's
layout and MoCo v2's / v3's; 2 gloo processes against one process on the full batch (the DCLW weights' mean is
taken over the global batch); the settings' one-line errors."""

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.losses import infonce_queue_loss, moco_v3_contrastive_loss, nt_xent_loss
from ssl_lightning.methods import MoCoV2, MoCoV3, SimCLR
from tests.ddp_utils import as_one_process, run_distributed

TEMPERATURE, SIGMA = 0.3, 0.5


def unit(rows: torch.Tensor) -> list[torch.Tensor]:
    return [row / row.norm() for row in rows]


def vmf_weights_by_loop(a: list[torch.Tensor], b: list[torch.Tensor], sigma: float) -> list[float]:
    """Sec. 4: w_i = 2 - exp(<a_i, b_i> / sigma) / E_j[exp(<a_j, b_j> / sigma)], no gradient."""
    kernels = [math.exp(float(torch.dot(x, y)) / sigma) for x, y in zip(a, b)]
    mean = sum(kernels) / len(kernels)
    return [2 - value / mean for value in kernels]


def dcl_term(anchor: torch.Tensor, positive: torch.Tensor, negatives: list[torch.Tensor], weight: float,
             temperature: float) -> torch.Tensor:
    """Eq. 6 for one anchor: -w <a, p> / t + log sum over the negatives (the positive NOT among them)."""
    log_denominator = torch.log(sum(torch.exp(torch.dot(anchor, n) / temperature) for n in negatives))
    return -weight * torch.dot(anchor, positive) / temperature + log_denominator


def simclr_dcl_by_loop(z1: torch.Tensor, z2: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Every one of the 2N anchors against its other view (positive) and the 2N - 2 other embeddings."""
    z = unit(torch.cat([z1, z2]))
    n = z1.shape[0]
    pair_weights = vmf_weights_by_loop(z[:n], z[n:], SIGMA) if weighted else [1.0] * n
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        negatives = [z[k] for k in range(2 * n) if k not in (i, j)]
        total = total + dcl_term(z[i], z[j], negatives, pair_weights[i % n], TEMPERATURE)
    return total / (2 * n)


def queue_dcl_by_loop(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, weighted: bool) -> torch.Tensor:
    qs, ks = unit(q), unit(k)
    weights = vmf_weights_by_loop(qs, ks, SIGMA) if weighted else [1.0] * len(qs)
    terms = [dcl_term(qs[i], ks[i], list(queue), weights[i], TEMPERATURE) for i in range(len(qs))]
    return sum(terms) / len(terms)


def moco_v3_dcl_by_loop(q: torch.Tensor, k: torch.Tensor, weighted: bool) -> torch.Tensor:
    """ctr(q, k) with the positive key left out of the denominator, times 2t (MoCo v3's scale)."""
    qs, ks = unit(q), unit(k)
    weights = vmf_weights_by_loop(qs, ks, SIGMA) if weighted else [1.0] * len(qs)
    terms = [dcl_term(qs[i], ks[i], [ks[m] for m in range(len(ks)) if m != i], weights[i], TEMPERATURE)
             for i in range(len(qs))]
    return sum(terms) / len(terms) * 2 * TEMPERATURE


@pytest.mark.parametrize("loss", ["dcl", "dclw"])
def test_losses_match_the_papers_formula_by_loops_in_value_and_gradient(loss: str) -> None:
    weighted = loss == "dclw"
    generator = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(2))
    queue = F.normalize(torch.randn(7, 5, dtype=torch.float64, generator=generator), dim=1)
    cases = [
        (lambda: nt_xent_loss(z1, z2, TEMPERATURE, loss, SIGMA), lambda: simclr_dcl_by_loop(z1, z2, weighted)),
        (lambda: infonce_queue_loss(z1, z2.detach(), queue, TEMPERATURE, loss, SIGMA),
         lambda: queue_dcl_by_loop(z1, z2.detach(), queue, weighted)),
        (lambda: moco_v3_contrastive_loss(z1, z2, TEMPERATURE, loss, SIGMA), lambda: moco_v3_dcl_by_loop(z1, z2, weighted)),
    ]
    for ours, reference in cases:
        actual, expected = ours(), reference()
        torch.testing.assert_close(actual, expected)
        for got, want in zip(torch.autograd.grad(actual, (z1, z2), allow_unused=True),
                             torch.autograd.grad(expected, (z1, z2), allow_unused=True)):
            if want is None:
                assert got is None or got.abs().max() == 0
            else:
                torch.testing.assert_close(got, want)


def test_dcl_is_below_nt_xent_and_the_weights_average_one() -> None:
    """Leaving the positive out of the denominator can only lower the loss; DCLW's weights have mean 1 and are
    larger for pairs that are less alike."""
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
    assert nt_xent_loss(z1, z2, 0.2, "dcl") < nt_xent_loss(z1, z2, 0.2)
    from ssl_lightning.losses import von_mises_fisher_weights

    weights = von_mises_fisher_weights(z1, z2, SIGMA)
    assert abs(float(weights.mean()) - 1.0) < 1e-6
    similarity = F.cosine_similarity(z1, z2)
    assert torch.equal(weights.argsort(), similarity.argsort(descending=True))


def _losses_on_ranks(rank: int, world_size: int, z: torch.Tensor, queue: torch.Tensor) -> dict[str, Any]:
    """Each rank's rows of the global batch (with gradients averaged as DDP does) for every form."""
    torch.set_num_threads(1)
    rows = slice(rank * z.shape[1] // world_size, (rank + 1) * z.shape[1] // world_size)
    results: dict[str, Any] = {}
    for loss in ("dcl", "dclw"):
        for form in ("simclr", "queue", "moco_v3"):
            z1, z2 = (z[v, rows].clone().requires_grad_(True) for v in range(2))
            if form == "simclr":
                value = nt_xent_loss(z1, z2, TEMPERATURE, loss, SIGMA)
            elif form == "queue":
                value = infonce_queue_loss(z1, z2, queue, TEMPERATURE, loss, SIGMA)
            else:
                value = moco_v3_contrastive_loss(z1, z2, TEMPERATURE, loss, SIGMA)
            mean, grads = as_one_process(value, torch.autograd.grad(value, (z1, z2)))
            results[f"{form}_{loss}"] = (mean, *grads)
    return results


def test_two_processes_equal_one_process_on_the_full_batch() -> None:
    """SimCLR's and MoCo v3's candidates are gathered with gradient and the DCLW weights' mean is global: the
    mean of the ranks' losses and its gradients are those of one process on the full batch. (The queue form's
    loss is per rank in MoCo v2 too; its DCLW weights still use the global mean.)"""
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(2, 8, 6, dtype=torch.float64, generator=generator) * 2
    queue = F.normalize(torch.randn(5, 6, dtype=torch.float64, generator=generator), dim=1)
    two = run_distributed(_losses_on_ranks, 2, z, queue)
    one = _losses_on_ranks(0, 1, z, queue)
    assert two.keys() == one.keys()
    for name in one:
        for got, want in zip(two[name], one[name]):
            torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("method", [SimCLR, MoCoV2, MoCoV3])
def test_bad_loss_settings_fail_when_built_with_one_line(method: type) -> None:
    kwargs = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}}
    with pytest.raises(ValueError, match="loss must be one of nt_xent, dcl, dclw, got 'dcl_w'") as error:
        method(loss="dcl_w", **kwargs)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="dclw_sigma must be positive, got 0"):
        method(loss="dclw", dclw_sigma=0.0, **kwargs)
