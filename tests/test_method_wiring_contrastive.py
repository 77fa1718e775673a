"""Method wiring of the two-view methods (issue 11, item 2): on a fixed batch, ``training_step``'s loss and the
gradients it sends into every parameter equal those of the loss recomputed here from the method's parts
(backbone, projector, predictor, target / momentum networks, queue) and the pure loss function, in the paper's
pairing of views and with the paper's stop-gradients; targets get no gradient, predictors live on the online
side only, MoCo v2's keys are normalized.

The target networks are perturbed before the step (as after some EMA updates): at initialization they equal the
online networks, and a target computed by the online network would go unnoticed. The reference runs each view
through the backbone in the same batches as the method (SimCLR: both views in one batch, as in its code; the
others: one call per view, as in the papers' pseudocode), since BatchNorm statistics depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.losses import (
    barlow_twins_loss,
    moco_v3_contrastive_loss,
    negative_cosine_similarity,
    normalized_mse,
    nt_xent_loss,
    vicreg_loss,
)
from ssl_lightning.methods import BYOL, BarlowTwins, MoCoV2, MoCoV3, SimCLR, SimSiam, SSLMethod, VICReg
from ssl_lightning.optim import OptimConfig
from tests.tiny_methods import BACKBONE, one_thread, tiny_method  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

Reference = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
PROJECTOR = {"projection_hidden_dim": 32, "projection_dim": 16}


def _build(cls: type[SSLMethod], **kwargs: Any) -> SSLMethod:
    """A tiny method: the momentum methods from tiny_methods, the others with a 32-16 projector."""
    if cls in (SimCLR, BarlowTwins, VICReg):
        torch.manual_seed(0)
        return cls(**BACKBONE, **PROJECTOR, optim=OptimConfig(name="sgd", lr=0.5), **kwargs)
    return tiny_method(cls, **kwargs)


def _perturb(*modules: nn.Module, seed: int = 1) -> None:
    """Move the target networks away from the online ones, as EMA updates would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _grads(model: nn.Module) -> dict[str, Optional[torch.Tensor]]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def _assert_wiring(model: SSLMethod, reference: Reference, seed: int = 0) -> dict[str, Any]:
    """``training_step``'s loss and gradients equal ``reference(model, view1, view2)``'s; returns the step's
    output and its logged values (``"logged"``) for method-specific checks."""
    batch = fixed_views(8, 16, num_views=2, seed=seed)
    out, logged = run_training_step(model, batch)
    out["loss"].backward()
    step_grads = _grads(model)

    model.zero_grad(set_to_none=True)
    expected = reference(model, *batch["views"])
    expected.backward()
    reference_grads = _grads(model)

    torch.testing.assert_close(out["loss"], expected, msg="training_step's loss differs from the reference")
    torch.testing.assert_close(logged["train/loss"], expected.detach())
    no_grad = {name for name, g in step_grads.items() if g is None}
    assert no_grad == {name for name, g in reference_grads.items() if g is None}, "gradients reach other parameters"
    for name, grad in step_grads.items():
        if grad is not None:
            torch.testing.assert_close(grad, reference_grads[name], msg=f"gradient of {name} differs")
    return {**out, "logged": logged}


def _assert_frozen(model: SSLMethod, *targets: nn.Module) -> None:
    """Targets: no gradient, not optimized; the predictor (if any) only on the online side."""
    optimized = {id(p) for module in [*model.optimized_modules(), *model.fixed_lr_modules()] for p in module.parameters()}
    for target in targets:
        assert all(not p.requires_grad and p.grad is None and id(p) not in optimized for p in target.parameters())
    assert {name.split(".")[0] for name, _ in model.named_modules() if "predictor" in name} <= {"predictor"}


def test_simclr_is_nt_xent_between_the_two_views_projections() -> None:
    """Chen et al. 2020, Algorithm 1: z = g(f(x)) of both views, NT-Xent with the configured temperature."""

    def reference(model: SimCLR, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        z1, z2 = model.projector(model.backbone(torch.cat([v1, v2]))).chunk(2)
        return nt_xent_loss(z1, z2, temperature=0.3)

    model = _build(SimCLR, temperature=0.3)
    _assert_wiring(model, reference)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # every layer trained


def test_simclr_with_separate_view_batch_norm_runs_each_view_alone() -> None:
    """``view_batch_norm: separate``: one backbone and projector call per view, each with its own BatchNorm
    statistics (lightly's and solo-learn's SimCLR); not the joined batch's loss."""

    def reference(model: SimCLR, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        z1, z2 = model.projector(model.backbone(v1)), model.projector(model.backbone(v2))
        return nt_xent_loss(z1, z2, temperature=0.3)

    out = _assert_wiring(_build(SimCLR, temperature=0.3, view_batch_norm="separate"), reference)
    joined, _ = run_training_step(_build(SimCLR, temperature=0.3), fixed_views(8, 16, num_views=2, seed=0))
    assert not torch.allclose(out["loss"], joined["loss"])  # the statistics differ, so do the losses
    with pytest.raises(ValueError, match="view_batch_norm must be 'joined' or 'separate', got 'both'"):
        _build(SimCLR, view_batch_norm="both")


def test_moco_v2_queries_of_view1_against_normalized_momentum_keys_of_view2_and_the_queue() -> None:
    """He et al. 2020, Algorithm 1 (kept by MoCo v2): q = f_q(x1), k = f_k(x2) without gradient, both
    L2-normalized; logits [q.k, q.queue] / T, the positive in column 0. Asymmetric, as in the paper's code."""

    def reference(model: MoCoV2, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        q = F.normalize(model.projector(model.backbone(v1)), dim=1)
        with torch.no_grad():
            k = F.normalize(model.key_projector(model.key_backbone(v2)), dim=1)
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ model.queue.T], dim=1) / 0.3
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    model = _build(MoCoV2, temperature=0.3)
    _perturb(model.key_backbone, model.key_projector)
    out = _assert_wiring(model, reference)
    _assert_frozen(model, model.key_backbone, model.key_projector)
    keys = out["keys"]  # what QueueUpdate enqueues: the momentum encoder's keys of view 2, unit norm, constants
    assert not keys.requires_grad
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(len(keys)))
    with torch.no_grad():
        expected = F.normalize(model.key_projector(model.key_backbone(fixed_views(8, 16, seed=0)["views"][1])), dim=1)
    torch.testing.assert_close(keys, expected)


def test_moco_v3_symmetric_with_the_predictor_on_the_query_side_only() -> None:
    """Chen, Xie, He 2021, Algorithm 1: q = pred(proj(f(x))), k = momentum proj(f(x)) without gradient and
    without predictor; loss = ctr(q1, k2) + ctr(q2, k1)."""

    def reference(model: MoCoV3, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        q1, q2 = (model.predictor(model.projector(model.backbone(v))) for v in (v1, v2))
        with torch.no_grad():
            k1, k2 = (model.momentum_projector(model.momentum_backbone(v)) for v in (v1, v2))
        return moco_v3_contrastive_loss(q1, k2, 0.5) + moco_v3_contrastive_loss(q2, k1, 0.5)

    model = _build(MoCoV3, temperature=0.5)
    _perturb(model.momentum_backbone, model.momentum_projector)
    _assert_wiring(model, reference)
    _assert_frozen(model, model.momentum_backbone, model.momentum_projector)


def test_byol_online_prediction_of_one_view_regresses_the_target_projection_of_the_other() -> None:
    """Grill et al. 2020, eq. 2: L = ||q(z1) - z'2||^2 on normalized vectors plus the symmetric L~ (view 2
    online, view 1 through the target); the target network gets no gradient and has no predictor."""

    def reference(model: BYOL, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        p1, p2 = (model.predictor(model.projector(model.backbone(v))) for v in (v1, v2))
        with torch.no_grad():
            t1, t2 = (model.target_projector(model.target_backbone(v)) for v in (v1, v2))
        return normalized_mse(p1, t2) + normalized_mse(p2, t1)

    model = _build(BYOL)
    _perturb(model.target_backbone, model.target_projector)
    _assert_wiring(model, reference)
    _assert_frozen(model, model.target_backbone, model.target_projector)


def test_simsiam_predictor_on_both_views_against_the_other_views_stopped_projection() -> None:
    """Chen and He 2021, Algorithm 1: L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2, one encoder.
    The reference detaches z, so equal gradients mean no gradient flows through the target branch; the same
    reference without the detach gives other gradients (the check can tell)."""

    def reference(model: SimSiam, v1: torch.Tensor, v2: torch.Tensor, stop: bool = True) -> torch.Tensor:
        z1, z2 = (model.projector(model.backbone(v)) for v in (v1, v2))
        p1, p2 = model.predictor(z1), model.predictor(z2)
        if stop:
            z1, z2 = z1.detach(), z2.detach()
        return negative_cosine_similarity(p1, z2) / 2 + negative_cosine_similarity(p2, z1) / 2

    model = _build(SimSiam)
    _assert_wiring(model, reference)
    stopped = _grads(model)
    model.zero_grad(set_to_none=True)
    reference(model, *fixed_views(8, 16, seed=0)["views"], stop=False).backward()
    backbone = [name for name in stopped if name.startswith("backbone.")]
    assert any(not torch.allclose(stopped[n], _grads(model)[n]) for n in backbone)


def test_barlow_twins_cross_correlation_of_the_two_views_projections() -> None:
    """Zbontar et al. 2021, Algorithm 1: z_a = proj(f(y_a)), z_b = proj(f(y_b)), C between them, sample b of
    one view against sample b of the other; lambda as configured, terms logged."""

    def reference(model: BarlowTwins, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        z1, z2 = (model.projector(model.backbone(v)) for v in (v1, v2))
        terms = barlow_twins_loss(z1, z2, off_diagonal_weight=0.02)
        expected_terms.update(on_diag=terms.on_diag.detach(), off_diag=terms.off_diag.detach())
        return terms.loss

    expected_terms: dict[str, torch.Tensor] = {}
    out = _assert_wiring(_build(BarlowTwins, off_diagonal_weight=0.02), reference)
    for name, value in expected_terms.items():
        torch.testing.assert_close(out["logged"][f"train/{name}"], value)


def test_vicreg_invariance_variance_covariance_of_the_two_views_projections() -> None:
    """Bardes et al. 2022, Algorithm 1: z_a, z_b the expander outputs of the two views; lambda, mu, nu as
    configured, terms logged."""
    weights = {"invariance_weight": 10.0, "variance_weight": 20.0, "covariance_weight": 3.0}

    def reference(model: VICReg, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        z1, z2 = (model.projector(model.backbone(v)) for v in (v1, v2))
        terms = vicreg_loss(z1, z2, **weights)
        expected_terms.update(invariance=terms.invariance, variance=terms.variance, covariance=terms.covariance)
        return terms.loss

    expected_terms: dict[str, torch.Tensor] = {}
    out = _assert_wiring(_build(VICReg, **weights), reference)
    for name, value in expected_terms.items():
        torch.testing.assert_close(out["logged"][f"train/{name}"], value.detach())
