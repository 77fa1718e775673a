"""DINOv2 (Oquab et al. 2023): KoLeo against pairwise distances by loops, Sinkhorn-Knopp centering against the
reference's formula by loops and on 2 gloo processes against one process on the full batch (KoLeo does not span
ranks: the reference computes it per rank and per global crop), the reference collator's stratified mask ratios,
the method's training step recomputed from its parts (Sinkhorn instead of the EMA center, separate heads, KoLeo
on the student's [CLS] of the global crops), the teacher without gradient and updated once per optimizer step,
and one-line errors for bad settings. Layer-wise lr decay is tested in test_layer_decay.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, seed_everything

from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.losses.ibot import masked_patch_weights
from ssl_lightning.losses.koleo import koleo_loss
from ssl_lightning.losses.swav import sinkhorn_knopp
from ssl_lightning.methods.dinov2 import DINOv2
from ssl_lightning.nn.masking import PatchMasks
from ssl_lightning.nn.masking import step_generator
from ssl_lightning.nn.masking.stratified import stratified_mask_ratios
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests.ddp_utils import run_distributed
from tests.test_swav import slow_sinkhorn
from tests.tiny_methods import one_thread, tiny_trainer  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step, stub_trainer

VIT = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2,
       "init_values": 1e-5}
HEADS = {"out_dim": 24, "patch_out_dim": 20, "hidden_dim": 16, "bottleneck_dim": 8}
ADAMW = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.04, warmup_epochs=0)


def tiny(seed: int = 0, drop_path: float = 0.0, **kwargs: Any) -> DINOv2:
    seed_everything(seed, verbose=False)
    args: dict[str, Any] = {"backbone": "vit_tiny", "backbone_kwargs": {**VIT, "drop_path_rate": drop_path}, **HEADS,
                            "mask_probability": 0.5, "mask_seed": 0, "optim": ADAMW}
    return DINOv2(**{**args, **kwargs})


# --- KoLeo --------------------------------------------------------------------------------------------------


def slow_koleo(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Sablayrolles et al. 2019, eq. 5 with the reference's eps: normalise each row, take the smallest distance to
    another row by a double loop, average -log(rho + eps)."""
    rows = [f / f.norm().clamp(min=eps) for f in features.double()]
    terms = []
    for i, x in enumerate(rows):
        distances = [torch.sqrt(((x - y + eps) ** 2).sum()) for j, y in enumerate(rows) if j != i]
        terms.append(-torch.log(min(distances) + eps))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("n, d, scale", [(2, 3, 1.0), (7, 5, 10.0), (16, 8, 0.01)])
def test_koleo_matches_the_nearest_neighbour_distances_by_loops(n: int, d: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(n)
    features = (torch.randn(n, d, generator=generator) * scale).requires_grad_(True)
    reference_input = features.detach().clone().requires_grad_(True)
    loss, expected = koleo_loss(features), slow_koleo(reference_input)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(features.grad.double(), reference_input.grad.double(), rtol=1e-4, atol=1e-6)


def test_koleo_is_large_for_close_features_and_needs_two_rows() -> None:
    base = torch.randn(1, 8)
    spread, close = torch.randn(6, 8), base + 1e-3 * torch.randn(6, 8)
    assert koleo_loss(close) > koleo_loss(spread) + 3.0
    with pytest.raises(ValueError, match=r"n >= 2") as err:
        koleo_loss(torch.randn(1, 8))
    assert "\n" not in str(err.value)


# --- Sinkhorn-Knopp centering -------------------------------------------------------------------------------


def dinov2_sinkhorn_by_loops(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """The reference's ``sinkhorn_knopp_teacher`` on Q = exp(logits / tau_t): SwAV's algorithm written out by loops
    (``tests/test_swav.slow_sinkhorn``) with epsilon = tau_t."""
    return slow_sinkhorn(logits, temperature, iterations)


@pytest.mark.parametrize("temperature, iterations", [(0.04, 3), (0.07, 3), (0.07, 1)])
def test_sinkhorn_centering_is_dinov2s_formula(temperature: float, iterations: int) -> None:
    """``swav.sinkhorn_knopp`` with ``epsilon = tau_t`` is DINOv2's teacher centering (logits of a weight-normalised
    head lie in [-1, 1])."""
    logits = torch.rand(10, 7, generator=torch.Generator().manual_seed(3)) * 2 - 1
    expected = dinov2_sinkhorn_by_loops(logits, temperature, iterations)
    torch.testing.assert_close(sinkhorn_knopp(logits, temperature, iterations).double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(expected.sum(dim=1), torch.ones(10, dtype=torch.float64))  # each sample's assignment


def _full_batch() -> dict[str, torch.Tensor]:
    """8 images' teacher [CLS] and patch tokens and masks; rank 0 of 2 masks 9 patches, rank 1 masks 3."""
    generator = torch.Generator().manual_seed(5)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[0, :5] = mask[2, 3:7] = mask[5, 10:13] = True
    return {"cls": torch.randn(8, 32, generator=generator), "patches": torch.randn(8, 16, 32, generator=generator),
            "mask": mask, "logits": torch.rand(8, 6, generator=generator) * 2 - 1}


def _masks(mask: torch.Tensor) -> PatchMasks:
    rows = mask.flatten().nonzero().squeeze(1)
    return PatchMasks(mask, rows, masked_patch_weights(mask).flatten()[rows])


def _centering(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank`` of ``world_size`` centers its rows of the full batch; the ranks' results are gathered."""
    from ssl_lightning.distributed import gather_variable_length

    full, model = _full_batch(), tiny()
    rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    out = {
        "sinkhorn": sinkhorn_knopp(full["logits"][rows], 0.05, 3),
        "cls": model.teacher_cls_probabilities(full["cls"][rows], 0.04),
        "patch": model.teacher_patch_probabilities(full["patches"][rows], _masks(full["mask"][rows]), 0.07),
    }
    return {name: gather_variable_length(value.contiguous()) for name, value in out.items()}


def test_sinkhorn_centering_on_two_processes_equals_one_process_on_the_full_batch() -> None:
    """Its sums (and the sample count: ranks hold different numbers of masked patches) are all-reduced."""
    two, one = run_distributed(_centering, 2), _centering(0, 1)
    assert one["patch"].shape == (12, 20) and one["cls"].shape == (8, 24)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)
    # rank 0's rows centered on their own differ: the sums over the other rank matter, so the check can fail
    full, model = _full_batch(), tiny()
    alone = model.teacher_patch_probabilities(full["patches"][:4], _masks(full["mask"][:4]), 0.07)
    assert alone.shape == (9, 20) and not torch.allclose(alone, two["patch"][:9], atol=1e-3)


# --- masks --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, probability", [(8, 0.5), (10, 0.3), (3, 1.0)])
def test_stratified_mask_ratios_mask_exactly_int_n_p_images_one_per_slice(n: int, probability: float) -> None:
    ratios = stratified_mask_ratios(n, (0.1, 0.5), probability, torch.Generator().manual_seed(n))
    masked = int(n * probability)
    assert ratios.shape == (n,) and int((ratios > 0).sum()) == masked
    edges = torch.linspace(0.1, 0.5, masked + 1)
    for i, ratio in enumerate(sorted(ratios[ratios > 0].tolist())):
        assert edges[i] - 1e-6 <= ratio <= edges[i + 1] + 1e-6
    orders = {tuple((stratified_mask_ratios(8, (0.1, 0.5), 0.5, torch.Generator().manual_seed(s)) > 0).tolist())
              for s in range(6)}
    assert len(orders) > 1  # shuffled over the batch
    with pytest.raises(ValueError, match="mask_probability"):
        stratified_mask_ratios(4, (0.1, 0.5), 0.0, torch.Generator())


def test_draw_masks_uses_the_step_generator_and_masks_half_the_global_crops() -> None:
    model = tiny()
    model._trainer = stub_trainer(global_step=3)  # type: ignore[assignment]
    try:
        masks = model.draw_masks(torch.zeros(8, 3, 16, 16), batch_idx=0)
        again = model.draw_masks(torch.zeros(8, 3, 16, 16), batch_idx=0)
    finally:
        model._trainer = None
    assert torch.equal(masks.mask, again.mask) and int(masks.mask.any(dim=1).sum()) == 4
    generator = step_generator(torch.device("cpu"), 0, 0, 3, 0)
    assert torch.equal(masks.mask.any(dim=1), stratified_mask_ratios(8, (0.1, 0.5), 0.5, generator) > 0)
    torch.testing.assert_close(masks.weights, masked_patch_weights(masks.mask).flatten()[masks.rows])


# --- the method's wiring ------------------------------------------------------------------------------------


def slow_cross_view(student: list[torch.Tensor], teacher: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Mean over (teacher global crop g, student crop v != g) pairs of the mean over images of H(P_t, P_s)."""
    terms = []
    for g, p_t in enumerate(teacher):
        for v, s in enumerate(student):
            if v != g:
                terms.append(torch.stack([-(p_t[b] * F.log_softmax(s[b] / tau, dim=-1)).sum()
                                          for b in range(s.shape[0])]).mean())
    return torch.stack(terms).mean()


def slow_patch_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Per image the mean cross-entropy over its masked patches; summed over the images / the number of images.
    ``student``/``teacher`` hold the masked patches' rows in row-major order of ``mask`` (2B, N)."""
    total, row = torch.zeros(()), 0
    for image in range(mask.shape[0]):
        terms = []
        for _ in range(int(mask[image].sum())):
            terms.append(-(teacher[row] * F.log_softmax(student[row] / tau, dim=-1)).sum())
            row += 1
        if terms:
            total = total + torch.stack(terms).mean()
    return total / mask.shape[0]


def test_training_step_is_dino_plus_ibot_with_sinkhorn_plus_koleo_on_the_global_cls() -> None:
    model = tiny()
    assert "center" not in dict(model.named_buffers()) and "patch_center" not in dict(model.named_buffers())
    assert model.patch_head is not None and model.teacher_patch_head is not None  # separate heads
    assert model.patch_head.last_layer.weight.shape[0] == 20 and model.head.last_layer.weight.shape[0] == 24
    batch = fixed_views(4, 16, num_local=2, local_size=8, seed=1)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    out, logged = run_training_step(model, batch, global_step=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # nothing carried: no EMA center

    model._trainer = stub_trainer(global_step=2)  # type: ignore[assignment]
    try:
        global_crops = torch.cat(batch["views"][:2])
        masks = model.draw_masks(global_crops, 0)
    finally:
        model._trainer = None
    assert masks.rows.numel() > 0
    vit, teacher_vit = model.backbone, model.teacher_backbone
    with torch.no_grad():
        tokens = vit.encode(vit.embed(global_crops, masks.mask, model.mask_token))  # masked global crops
        student = [model.head(vit.class_token(tokens))] + [model.head(vit(v)) for v in batch["views"][2:]]
        student = list(torch.cat(student).chunk(4))
        student_patch = model.patch_head(vit.patch_tokens(tokens).flatten(0, 1)[masks.mask.flatten()])
        teacher_tokens = teacher_vit.encode(teacher_vit.embed(global_crops))  # unmasked
        teacher_cls = dinov2_sinkhorn_by_loops(model.teacher_head(teacher_vit.class_token(teacher_tokens)), 0.04).float()
        teacher_patch = dinov2_sinkhorn_by_loops(model.teacher_patch_head(
            teacher_vit.patch_tokens(teacher_tokens).flatten(0, 1)[masks.mask.flatten()]), 0.04).float()
        cls_loss = slow_cross_view(student, list(teacher_cls.chunk(2)), 0.1)
        patch_loss = slow_patch_loss(student_patch, teacher_patch, masks.mask, 0.1)
        # per global crop, this rank's rows (koleo_loss is checked against loops above; with LayerScale at 1e-5 the
        # [CLS] features of a fresh ViT lie within ~1e-4 of each other, where float32 and a float64 loop part ways)
        koleo = 0.1 * (koleo_loss(vit.class_token(tokens)[:4]) + koleo_loss(vit.class_token(tokens)[4:]))
    torch.testing.assert_close(logged["train/cls_loss"], cls_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logged["train/patch_loss"], patch_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logged["train/koleo_loss"], koleo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), cls_loss + patch_loss + koleo, rtol=1e-4, atol=1e-5)

    # the teacher gets no gradient; KoLeo's reaches the student backbone
    out["loss"].backward()
    assert all(p.grad is None for p in [*teacher_vit.parameters(), *model.teacher_head.parameters(),
                                        *model.teacher_patch_head.parameters()])
    assert model.mask_token.grad is not None and model.patch_head.last_layer.parametrizations.weight.original1.grad is not None
    model.zero_grad()
    no_koleo = tiny(koleo_weight=0.0)
    _, logged_off = run_training_step(no_koleo, batch, global_step=2)
    assert "train/koleo_loss" not in logged_off
    torch.testing.assert_close(logged_off["train/loss"], cls_loss + patch_loss, rtol=1e-4, atol=1e-5)


def test_vit_recipe_layerscale_registers_drop_path_in_the_student_only() -> None:
    model = tiny(drop_path=0.2)
    timm_vit = model.backbone.model
    assert timm_vit.num_prefix_tokens == 3 and timm_vit.reg_token.shape == (1, 2, 32)
    assert torch.allclose(timm_vit.blocks[0].ls1.gamma, torch.full((32,), 1e-5))
    student_drop = [m.drop_prob for m in model.backbone.modules() if hasattr(m, "drop_prob")]
    teacher_drop = [m.drop_prob for m in model.teacher_backbone.modules() if hasattr(m, "drop_prob")]
    assert max(student_drop) > 0 and teacher_drop and max(teacher_drop) == 0
    (callback,) = model.configure_callbacks()
    assert isinstance(callback, MomentumUpdate)
    assert callback.pairs == [("backbone", "teacher_backbone"), ("head", "teacher_head"),
                              ("patch_head", "teacher_patch_head")]


class _TeacherMoves(Callback):
    """Did the teacher change during each batch? Read at the start of the next batch and at the end of training,
    after every batch-end hook (``MomentumUpdate`` comes from ``configure_callbacks``, after this one)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.last: torch.Tensor | None = None
        self.moved: list[bool] = []

    def _check(self, pl_module) -> None:
        now = pl_module.teacher_patch_head.last_layer.parametrizations.weight.original1.clone()
        if self.last is not None:
            self.moved.append(not torch.equal(now, self.last))
        self.last = now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._check(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check(pl_module)


def test_fit_updates_the_teacher_once_per_optimizer_step_with_layer_decay(tmp_path: Path) -> None:
    model = tiny(freeze_last_layer_epochs=0, base_momentum=0.9, final_weight_decay=0.2,
                 optim=OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04, warmup_epochs=0, layer_decay=0.9))
    data = SyntheticData(num_samples=32, batch_size=4, image_size=16, num_workers=0, seed=0,
                         views=SimCLRViews(16, num_local=2, local_size=8))
    record = _TeacherMoves()
    trainer = tiny_trainer(tmp_path, max_steps=2, accumulate=2, callbacks=[record])
    trainer.fit(model, data)
    assert record.moved == [False, True, False, True]
    lrs = sorted({group["initial_lr"] for group in trainer.optimizers[0].param_groups})  # before the schedule
    assert len(lrs) == 2 + 2  # layers 0..depth + 1 of a depth-2 ViT: each its own rate


# --- bad settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"backbone": "cifar_resnet18", "backbone_kwargs": {"reg_tokens": 4}}, r"reg_tokens=4\) need a timm ViT"),
    ({"backbone": "mae_vit_tiny", "backbone_kwargs": {"reg_tokens": 1}}, r"reg_tokens=1\) need a timm ViT"),
    ({"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}}, "needs a ViT backbone"),
    ({"koleo_weight": -0.1}, "koleo_weight"),
    ({"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
    ({"backbone_kwargs": {**VIT, "image_size": 18}}, "not divisible"),
])
def test_bad_settings_fail_with_one_line(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        tiny(**kwargs)
    assert "\n" not in str(err.value)


def test_layer_decay_outside_zero_one_fails_when_the_config_is_made() -> None:
    with pytest.raises(ValueError, match=r"optim\.layer_decay must lie in \(0, 1\] \(or be null\), got 1.5"):
        tiny(optim=OptimConfig(name="adamw", layer_decay=1.5))
