"""MSN / PMSN (Assran et al. 2022; 2023): sharpening, the loss against a loop over anchors and prototypes (the
papers' formulas), me-max and the power-law prior on 2 processes against 1, dropped patches never reaching the
encoder, the EMA target (no gradient, one update per optimizer step), the training step's wiring, bad settings."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer, seed_everything

from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.losses.msn import msn_loss, power_law_prior, prior_kl, sharpen
from ssl_lightning.methods.msn import MSN
from ssl_lightning.nn.masking import masked_indices, step_generator
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests.ddp_utils import run_distributed
from tests.tiny_methods import one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step, stub_trainer

VIT = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
TAU, TAU_T, T = 0.1, 0.1, 0.25


def tiny_msn(**kwargs: Any) -> MSN:
    torch.manual_seed(0)
    args: dict[str, Any] = {"backbone": "vit_tiny", "backbone_kwargs": VIT, "mask_ratio": 0.5, "focal_views": 2,
                            "projection_hidden_dim": 16, "projection_dim": 8, "num_prototypes": 10,
                            "optim": OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04, warmup_epochs=0)}
    return MSN(**{**args, **kwargs})


# ---------------------------------------------------------------- the loss against the papers' formulas

def slow_probabilities(z: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> list[float]:
    """softmax_k(cos(z, q_k) / temperature), one prototype at a time."""
    scores = [float(z @ q / (z.norm() * q.norm())) / temperature for q in prototypes]
    exps = [math.exp(s) for s in scores]
    return [e / sum(exps) for e in exps]


def slow_sharpen(p: list[float], temperature: float) -> list[float]:
    powered = [x ** (1 / temperature) for x in p]
    return [x / sum(powered) for x in powered]


def slow_sinkhorn(p: list[list[float]], iterations: int) -> list[list[float]]:
    """The reference code's loop: Q (K x B) scaled to total 1, then rows to 1/K and columns to 1/B in turn; x B."""
    batch, k = len(p), len(p[0])
    total = sum(sum(row) for row in p)
    q = [[p[i][j] / total for i in range(batch)] for j in range(k)]
    for _ in range(iterations):
        for j in range(k):
            row = sum(q[j])
            q[j] = [x / row / k for x in q[j]]
        for i in range(batch):
            column = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / column / batch
    return [[q[j][i] * batch for j in range(k)] for i in range(batch)]


def slow_msn_loss(anchors: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor, exponent: float,
                  weight: float, sinkhorn: int) -> tuple[float, float, float]:
    """MSN eq. 2 term by term: (1 / VB) sum_{v,i} H(p+_i, p_{v,i}) + weight * sum_k p_bar_k log(p_bar_k / prior_k),
    prior_k = k^-exponent / sum_j j^-exponent (exponent 0: uniform, me-max's log K - H(p_bar))."""
    num_views, batch, _ = anchors.shape
    k = prototypes.shape[0]
    target = [slow_sharpen(slow_probabilities(targets[i], prototypes, TAU_T), T) for i in range(batch)]
    if sinkhorn:
        target = slow_sinkhorn(target, sinkhorn)
    anchor = [[slow_probabilities(anchors[v, i], prototypes, TAU) for i in range(batch)] for v in range(num_views)]
    ce = sum(-target[i][j] * math.log(anchor[v][i][j]) for v in range(num_views) for i in range(batch)
             for j in range(k)) / (num_views * batch)
    mean = [sum(anchor[v][i][j] for v in range(num_views) for i in range(batch)) / (num_views * batch) for j in range(k)]
    prior = [(j + 1) ** -exponent for j in range(k)]
    prior = [x / sum(prior) for x in prior]
    regularizer = sum(mean[j] * math.log(mean[j] / prior[j]) for j in range(k))
    return ce + weight * regularizer, ce, regularizer


def test_sharpen_is_the_renormalised_power() -> None:
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(4, 7, dtype=torch.float64) * 3, dim=-1)
    for temperature in (0.25, 0.5, 1.0):
        expected = torch.tensor([slow_sharpen(row.tolist(), temperature) for row in p], dtype=torch.float64)
        torch.testing.assert_close(sharpen(p, temperature), expected)
    assert (sharpen(p, 0.25).max(dim=-1).values > p.max(dim=-1).values).all()  # sharper
    with pytest.raises(ValueError, match="sharpening temperature"):
        sharpen(p, 0.0)


@pytest.mark.parametrize("exponent", [0.0, 0.25])
@pytest.mark.parametrize("sinkhorn", [0, 3])
def test_loss_matches_a_loop_over_anchors_and_prototypes(exponent: float, sinkhorn: int) -> None:
    torch.manual_seed(1)
    anchors, targets, prototypes = torch.randn(3, 4, 6), torch.randn(4, 6), torch.randn(5, 6)
    prior = power_law_prior(5, exponent) if exponent else None  # None: uniform (me-max)
    terms = msn_loss(anchors, targets, prototypes, TAU, TAU_T, T, 0.7, prior, sinkhorn)
    expected = slow_msn_loss(anchors, targets, prototypes, exponent, 0.7, sinkhorn)
    for value, reference in zip(terms, expected):
        assert value.item() == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_loss_is_float32_under_bf16_autocast() -> None:
    torch.manual_seed(2)
    anchors, targets, prototypes = torch.randn(2, 6, 16), torch.randn(6, 16), torch.randn(32, 16)
    expected = msn_loss(anchors, targets, prototypes, sinkhorn_iterations=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = msn_loss(anchors.bfloat16(), targets.bfloat16(), prototypes, sinkhorn_iterations=3)
    assert terms.loss.dtype == torch.float32
    # only the bf16 rounding of the inputs remains (the cosines themselves are float32)
    again = msn_loss(anchors.bfloat16().float(), targets.bfloat16().float(), prototypes, sinkhorn_iterations=3)
    torch.testing.assert_close(terms.loss, again.loss)
    assert (terms.loss - expected.loss).abs() < 0.05


def test_me_max_is_the_kl_to_the_uniform_prior_and_zero_only_there() -> None:
    p = torch.softmax(torch.randn(9), dim=0)
    entropy = -(p * p.log()).sum()
    torch.testing.assert_close(prior_kl(p), math.log(9) - entropy)
    torch.testing.assert_close(prior_kl(p), prior_kl(p, power_law_prior(9, 0.0)))
    assert prior_kl(torch.full((9,), 1 / 9)).abs() < 1e-6 and prior_kl(p) > 0
    law = power_law_prior(9, 0.25)
    torch.testing.assert_close(law, torch.tensor([k ** -0.25 for k in range(1, 10)]) / sum(k ** -0.25 for k in range(1, 10)))
    assert prior_kl(law, law).abs() < 1e-6 and prior_kl(torch.full((9,), 1 / 9), law) > 0


# ---------------------------------------------------------------- 2 processes = 1 process on the full batch

SETTINGS = [(None, 0), (None, 3), (0.25, 0), (0.25, 3)]  # (power-law exponent or uniform, Sinkhorn iterations)


def _ddp_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x_anchor = torch.randn(3, 8, 6, generator=generator)  # 3 anchor views of a global batch of 8 images
    x_target = torch.randn(8, 6, generator=generator)
    weight = torch.randn(6, 5, generator=generator)
    prototypes = torch.randn(7, 5, generator=generator)
    return x_anchor, x_target, weight, prototypes


def _loss_and_grads(x_anchor, x_target, weight, prototypes, exponent, sinkhorn):
    """The loss of anchors and targets made by a shared linear layer, and the gradients of that layer and the prototypes."""
    weight, prototypes = weight.clone().requires_grad_(), prototypes.clone().requires_grad_()
    prior = None if exponent is None else power_law_prior(prototypes.shape[0], exponent)
    terms = msn_loss(x_anchor @ weight, x_target @ weight.detach(), prototypes, TAU, TAU_T, T, 1.0, prior, sinkhorn)
    terms.loss.backward()
    return [term.detach() for term in terms], [weight.grad, prototypes.grad]


def _on_ranks(rank: int, world_size: int) -> list[Any]:
    x_anchor, x_target, weight, prototypes = _ddp_inputs()
    rows = slice(rank * 4, rank * 4 + 4)
    results = []
    for exponent, sinkhorn in SETTINGS:
        terms, grads = _loss_and_grads(x_anchor[:, rows], x_target[rows], weight, prototypes, exponent, sinkhorn)
        for tensor in [terms[0], terms[1], *grads]:  # what DDP averages: the gradients (and the logged losses)
            dist.all_reduce(tensor)
            tensor /= world_size
        results.append({"loss": terms[0], "cross_entropy": terms[1], "regularizer": terms[2], "grads": grads})
    return results


def test_two_processes_equal_one_process_on_the_full_batch() -> None:
    """The mean anchor prediction spans both ranks (and Sinkhorn's sums): every rank's regulariser is the full
    batch's, and the averaged loss and gradients of the encoder and the prototypes are one process's."""
    results = run_distributed(_on_ranks, 2)
    for (exponent, sinkhorn), result in zip(SETTINGS, results):
        terms, grads = _loss_and_grads(*_ddp_inputs(), exponent, sinkhorn)
        torch.testing.assert_close(result["loss"], terms[0])
        torch.testing.assert_close(result["cross_entropy"], terms[1])
        torch.testing.assert_close(result["regularizer"], terms[2])  # rank 0's own value, not averaged
        torch.testing.assert_close(result["grads"], grads)


# ---------------------------------------------------------------- the method

def test_dropped_patches_never_reach_the_encoder() -> None:
    model = tiny_msn()
    images = torch.randn(3, 3, 16, 16)
    seen: list[tuple[int, ...]] = []
    model.backbone.model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    features, mask = model.masked_anchor(images, step_generator(torch.device("cpu"), 0, 1))
    assert seen == [(3, 1 + 8, 32)] and mask.sum(dim=1).tolist() == [8, 8, 8]  # [CLS] + the 8 kept of 16 patches
    changed = images.clone()
    for image in range(3):
        for patch in masked_indices(mask)[image].tolist():
            row, col = divmod(patch, 4)
            changed[image, :, 4 * row: 4 * row + 4, 4 * col: 4 * col + 4] = torch.randn(3, 4, 4) * 10
    again, same_mask = model.masked_anchor(changed, step_generator(torch.device("cpu"), 0, 1))
    assert torch.equal(mask, same_mask)
    torch.testing.assert_close(again, features)
    kept = (~mask[0]).nonzero()[0].item()
    row, col = divmod(kept, 4)
    changed[0, :, 4 * row: 4 * row + 4, 4 * col: 4 * col + 4] += torch.randn(3, 4, 4)
    assert not torch.allclose(model.masked_anchor(changed, step_generator(torch.device("cpu"), 0, 1))[0][0], features[0])


@pytest.mark.parametrize("num_views", [1, 2])
def test_training_step_is_the_loss_of_its_parts(num_views: int) -> None:
    model = tiny_msn(prior="power_law")
    batch = fixed_views(4, 16, num_views=num_views, num_local=2, local_size=8)
    out, logged = run_training_step(model, batch, global_step=3)
    views = batch["views"]
    with torch.no_grad():
        generator = step_generator(torch.device("cpu"), model.mask_seed, 0, 3, 0)  # (seed, rank, step, micro-batch)
        features, _ = model.masked_anchor(views[num_views - 1], generator)  # views[1], or views[0] when alone
        focal = model.head(model.backbone(torch.cat(views[num_views:])))
        anchors = torch.cat([model.head(features), focal]).unflatten(0, (3, 4))
        target = model.target_head(model.target_backbone(views[0]))
        terms = msn_loss(anchors, target, model.prototypes, TAU, TAU_T, T, 1.0, power_law_prior(10, 0.25), 3)
    torch.testing.assert_close(out["loss"].detach(), terms.loss)
    torch.testing.assert_close(logged["train/cross_entropy"], terms.cross_entropy)
    torch.testing.assert_close(logged["train/regularizer"], terms.regularizer)
    torch.testing.assert_close(out["features"], features)
    torch.testing.assert_close(out["embeddings"], anchors[0])
    out["loss"].backward()
    assert model.prototypes.grad is not None and model.backbone.model.cls_token.grad is not None
    assert all(p.grad is None and not p.requires_grad
               for p in [*model.target_backbone.parameters(), *model.target_head.parameters()])


class _Record(Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # after the last batch's EMA
        self.states.append({name: p.detach().clone() for name, p in pl_module.named_parameters()})


def test_target_is_updated_once_per_optimizer_step(tmp_path: Path) -> None:
    """Accumulating 2 batches per step: the target moves at every second batch, to m * target + (1 - m) * online."""
    seed_everything(0, verbose=False)
    model = tiny_msn(base_momentum=0.9, momentum_schedule="constant", final_weight_decay=0.4)
    assert [type(c) for c in model.configure_callbacks()] == [MomentumUpdate]
    assert model.configure_callbacks()[0].pairs == [("backbone", "target_backbone"), ("head", "target_head")]
    record = _Record()
    data = SyntheticData(num_samples=32, batch_size=4, image_size=16, num_workers=0, seed=0,
                         views=SimCLRViews(16, num_local=2, local_size=8))
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2, logger=False,
                      limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=[record])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    states = record.states + [{name: p.detach().clone() for name, p in model.named_parameters()}]
    first = states[0]
    targets = [name for name in first if name.startswith(("target_backbone.", "target_head."))]
    assert targets
    for batch in range(1, 5):
        before, after = states[batch - 1], states[batch]
        moved = any(not torch.equal(before[name], after[name]) for name in targets)
        assert moved == (batch % 2 == 0), f"batch {batch}"
        if batch % 2 == 0:
            for name in targets:
                online = after[name.replace("target_", "", 1)]
                torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * online)
    (group,) = [g for g in trainer.optimizers[0].param_groups if any(p is model.prototypes for p in g["params"])]
    assert group["weight_decay"] == 0.0  # the prototypes are not decayed; the weights are, on the schedule
    assert any(g["weight_decay"] > 0.04 for g in trainer.optimizers[0].param_groups)


# ---------------------------------------------------------------- bad settings: one line, naming the setting

def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _views(**kwargs: Any) -> SimpleNamespace:
    return SimpleNamespace(**{"size": 16, "num_views": 2, "num_local": 2, "local_size": 8, **kwargs})


def test_bad_settings_fail_with_one_line() -> None:
    with pytest.raises(ValueError, match="MSN needs a ViT backbone") as error:
        MSN(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4})
    _one_line(error)
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"mask_ratio must lie in \\(0, 1\\), got {ratio}") as error:
            tiny_msn(mask_ratio=ratio)
        _one_line(error)
    with pytest.raises(ValueError, match="prior must be"):
        tiny_msn(prior="gaussian")
    model = tiny_msn()
    for views, setting in [(_views(num_views=0), "num_views=0"), (_views(num_local=0), "focal_views=2"),
                           (_views(size=18), "views.size=18"), (_views(local_size=6), "views.local_size=6")]:
        model._trainer = stub_trainer(datamodule=SimpleNamespace(views=views))
        with pytest.raises(ValueError, match=setting) as error:
            model.setup("fit")
        _one_line(error)
    model._trainer = stub_trainer(datamodule=SimpleNamespace(views=_views()))
    model.setup("fit")
    with pytest.raises(ValueError, match="focal_views=2 focal crops per image, the data makes .*num_local=0"):
        run_training_step(model, fixed_views(4, 16, num_views=2))  # the config asks for focal crops, none came
