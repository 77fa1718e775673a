"""iBOT (Zhou et al. 2022): the patch loss and the [CLS] loss against loops over images, patches and crop pairs;
the blockwise mask sampler against the BEiT/iBOT rejection loop written per image; the training step recomputed
from its parts (masked student, unmasked teacher, both centers, both temperatures); the centers on 2 gloo
processes against 1 process on the full batch; the EMA teacher in a tiny fit; bad settings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.losses.dino import dino_loss
from ssl_lightning.losses.ibot import cross_view_loss, ibot_patch_loss, masked_patch_weights
from ssl_lightning.methods.ibot import IBOT
from ssl_lightning.nn.masking import PatchMasks
from ssl_lightning.nn.masking import step_generator
from ssl_lightning.nn.masking.blockwise import block_masks, blockwise_mask, mask_ratios
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests.ddp_utils import run_distributed
from tests.tiny_methods import one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

VIT = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                                   "num_heads": 2}}
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


def tiny_ibot(**kwargs: Any) -> IBOT:
    torch.manual_seed(0)
    args: dict[str, Any] = {**VIT, "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8,
                            "optim": OptimConfig(name="adamw", lr=1e-2, weight_decay=0.04, warmup_epochs=0)}
    return IBOT(**{**args, **kwargs})


# --- losses ----------------------------------------------------------------------------------------------------


def slow_patch_loss(student: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor, tau_s: float) -> torch.Tensor:
    """Eq. 1 term by term: for each image, the mean over its masked patches of H(P_t, P_s); then the mean over
    the images (an image with no masked patch counts 0, as the reference's ``clamp(min=1)``)."""
    images, patches, classes = student.shape
    total = torch.zeros(())
    for i in range(images):
        image_sum, masked = torch.zeros(()), 0
        for p in range(patches):
            if not mask[i, p]:
                continue
            log_p_s = student[i, p] / tau_s - torch.logsumexp(student[i, p] / tau_s, dim=0)
            image_sum = image_sum + sum(-teacher_probs[i, p, k] * log_p_s[k] for k in range(classes))
            masked += 1
        total = total + image_sum / max(masked, 1)
    return total / images


def test_patch_loss_matches_a_loop_over_images_and_masked_patches() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 6, 5, requires_grad=True)
    teacher = F.softmax(torch.randn(4, 6, 5) / 0.07, dim=-1)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 0]]).bool()
    weights = masked_patch_weights(mask)
    loss = ibot_patch_loss(student, teacher, weights, 0.1)  # every patch, weights 0 where unmasked
    expected = slow_patch_loss(student, teacher, mask, 0.1)
    torch.testing.assert_close(loss, expected, **CLOSE)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, **CLOSE)
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().min() > 0
    # only the masked rows, as the method computes it
    torch.testing.assert_close(ibot_patch_loss(student[mask], teacher[mask], weights[mask], 0.1), expected, **CLOSE)
    # the teacher's (or the student's) output at an unmasked patch does not count; at a masked one it does
    changed_teacher, changed_student = teacher.clone(), student.detach().clone()
    changed_teacher[0, 1], changed_teacher[1, 3] = teacher[0, 1].flip(0), teacher[1, 3].roll(1)
    changed_student[0, 4] += 3.0
    torch.testing.assert_close(ibot_patch_loss(changed_student, changed_teacher, weights, 0.1), loss.detach())
    changed_teacher[0, 2] = teacher[0, 2].roll(1)
    assert not torch.allclose(ibot_patch_loss(student, changed_teacher, weights, 0.1), loss)
    # the mean of two halves' losses (2 ranks, DDP's gradient average) is the full batch's
    halves = [ibot_patch_loss(student[r], teacher[r], masked_patch_weights(mask[r]), 0.1) for r in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss, **CLOSE)


def test_cls_loss_is_dino_loss_with_the_centered_sharpened_teacher_and_a_loop() -> None:
    torch.manual_seed(1)
    student = [torch.randn(3, 5) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(3, 5) for _ in range(2)]
    center = torch.randn(1, 5)
    probs = [F.softmax((t - center) / 0.04, dim=-1) for t in teacher]
    loss = cross_view_loss(student, probs, 0.1)
    torch.testing.assert_close(loss, dino_loss(student, teacher, center, 0.1, 0.04), **CLOSE)
    pairs = [(g, v) for g in range(2) for v in range(4) if v != g]
    expected = sum(-(probs[g] * F.log_softmax(student[v] / 0.1, dim=-1)).sum(-1).mean() for g, v in pairs) / len(pairs)
    torch.testing.assert_close(loss, expected, **CLOSE)


# --- blockwise masks -------------------------------------------------------------------------------------------


def slow_block_mask(budget: float, grid: tuple[int, int], draws: torch.Tensor, aspect=(0.3, 1 / 0.3)) -> torch.Tensor:
    """BEiT's algorithm 1 with iBOT's minimum block area ``(min(H, W) // 3) ** 2``, for ONE image, taking its
    uniform numbers from ``draws`` (rounds, 4) in order; stops after 10 rejections in a row."""
    rows, cols = grid
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    count, failures, attempt = 0, 0, 0
    while count < budget and failures < 10:
        u = draws[attempt].tolist()
        attempt += 1
        area = (min(rows, cols) // 3) ** 2 + u[0] * (budget - count - (min(rows, cols) // 3) ** 2)
        ratio = math.exp(math.log(aspect[0]) + u[1] * (math.log(aspect[1]) - math.log(aspect[0])))
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if h < rows and w < cols:
            top, left = int(u[2] * (rows - h + 1)), int(u[3] * (cols - w + 1))
            new = h * w - int(mask[top: top + h, left: left + w].sum())
            if 0 < new <= budget - count:
                mask[top: top + h, left: left + w] = True
                count, failures = count + new, 0
                continue
        failures += 1
    return mask.flatten()


def test_block_masks_follow_the_per_image_rejection_loop() -> None:
    """The lockstep sampler gives every image the mask of the sequential algorithm fed with its own numbers."""
    grid = (7, 9)
    ratios = torch.tensor([0.1, 0.0, 0.5, 0.3, 0.45, 0.2], dtype=torch.float64)
    masks = block_masks(ratios, grid, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    draws = torch.stack([torch.rand(6, 4, generator=replay, dtype=torch.float64) for _ in range(700)], dim=1)
    for image in range(6):
        expected = slow_block_mask(float(ratios[image]) * 63, grid, draws[image])
        assert torch.equal(masks[image], expected), image
    assert masks[1].sum() == 0 and masks.sum(dim=1).min() == 0 and (masks.sum(dim=1)[[0, 2, 3, 4, 5]] > 0).all()


def test_blockwise_masks_ratio_rectangles_per_image_and_resume() -> None:
    grid, n = (8, 8), 64
    ratios = mask_ratios(4000, (0.1, 0.5), 0.5, torch.Generator().manual_seed(0))
    masked = ratios > 0
    assert abs(masked.float().mean() - 0.5) < 0.03  # a share of the images is masked at all
    assert ratios[masked].min() >= 0.1 and ratios[masked].max() <= 0.5 and abs(ratios[masked].mean() - 0.3) < 0.01
    ratios = mask_ratios(64, (0.1, 0.5), 1.0, torch.Generator().manual_seed(1))
    masks = block_masks(ratios, grid, torch.Generator().manual_seed(2))
    counts = masks.sum(dim=1)
    assert (counts <= ratios * n).all() and (counts > 0).all()  # never beyond the drawn ratio
    assert (counts >= 0.5 * ratios * n).float().mean() > 0.9  # and usually close to it
    assert len({tuple(m.tolist()) for m in masks}) == 64  # each image its own mask
    # rectangles: a mask with one block is the bounding box of its patches
    one_block = block_masks(torch.tensor([0.2] * 32), grid, torch.Generator().manual_seed(3))
    for m in one_block.view(-1, *grid):
        rows, cols = m.nonzero(as_tuple=True)
        box = torch.zeros_like(m)
        box[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1] = True
        if m.sum() >= 4 and torch.equal(m, box):
            break
    else:
        pytest.fail("no mask was a single rectangle")
    # the same key draws the same masks (exact resume); another rank or step draws others
    draw = lambda *key: blockwise_mask(16, grid, (0.1, 0.5), 0.5, step_generator(torch.device("cpu"), 7, *key))
    assert torch.equal(draw(0, 3, 0), draw(0, 3, 0))
    assert not torch.equal(draw(0, 3, 0), draw(1, 3, 0)) and not torch.equal(draw(0, 3, 0), draw(0, 4, 0))


# --- the training step, from its parts -------------------------------------------------------------------------


def record_masks(model: IBOT) -> list[PatchMasks]:
    drawn: list[PatchMasks] = []
    original = model.draw_masks

    def spy(*args: Any) -> PatchMasks:
        drawn.append(original(*args))
        return drawn[-1]

    model.draw_masks = spy  # type: ignore[method-assign]
    return drawn


@pytest.mark.parametrize("shared_head", [True, False], ids=["shared-head", "separate-heads"])
def test_step_masked_student_unmasked_teacher_two_centers(shared_head: bool) -> None:
    """Algorithm 1: the student sees the masked global crops ([CLS] and masked patches) and the unmasked local
    crops ([CLS]); the teacher the unmasked global crops; P_t = softmax((g - C) / tau_t) for [CLS] and
    softmax((g' - C') / tau_t') for the patches, C' the mean of all teacher patch outputs; L = L_cls + L_mim."""
    warmup, tau_s, epoch, start = 11, 0.1, 5, 2
    extra = {} if shared_head else {"shared_head": False, "patch_out_dim": 24}
    model = tiny_ibot(warmup_teacher_temperature=0.04, teacher_temperature=0.07, warmup_teacher_patch_temperature=0.05,
                      teacher_patch_temperature=0.08, warmup_teacher_temperature_epochs=warmup, mask_start_epoch=start,
                      mask_probability=0.75, **extra)
    teachers = [model.teacher_backbone, model.teacher_head] + ([] if shared_head else [model.teacher_patch_head])
    with torch.no_grad():  # a teacher away from the student, as after some steps; non-zero centers
        for param in (p for m in teachers for p in m.parameters()):
            param.add_(0.1 * torch.randn_like(param))
        model.center.normal_()
        model.patch_center.normal_()
        model.mask_token.normal_()
    center, patch_center = model.center.clone(), model.patch_center.clone()
    views = fixed_views(4, 16, num_views=2, num_local=2, local_size=8)["views"]
    teacher_inputs: list[torch.Tensor] = []
    model.teacher_backbone.model.patch_embed.register_forward_hook(lambda m, args, out: teacher_inputs.append(args[0]))
    drawn = record_masks(model)

    out, logged = run_training_step(model, {"views": views, "label": torch.zeros(4).long()}, current_epoch=epoch)
    out["loss"].backward()

    assert len(teacher_inputs) == 1 and torch.equal(teacher_inputs[0], torch.cat(views[:2]))  # unmasked global crops
    mask = drawn[0].mask
    assert mask.shape == (8, 16) and 0 < mask.sum() < mask.numel()
    tau_t, tau_p = 0.04 + 0.03 * epoch / (warmup - 1), 0.05 + 0.03 * (epoch - start) / (warmup - 1)
    assert logged["train/teacher_temperature"] == pytest.approx(tau_t)
    vit, teacher_vit = model.backbone, model.teacher_backbone
    patch_head = model.head if shared_head else model.patch_head
    teacher_patch_head = model.teacher_head if shared_head else model.teacher_patch_head
    student_tokens = vit.encode(vit.embed(torch.cat(views[:2]), mask, model.mask_token))
    local_tokens = vit.encode(vit.embed(torch.cat(views[2:])))
    with torch.no_grad():
        teacher_tokens = teacher_vit.encode(teacher_vit.embed(torch.cat(views[:2])))
        teacher_cls = model.teacher_head(teacher_tokens[:, 0])
        teacher_patch = teacher_patch_head(teacher_tokens[:, 1:])
    student_cls = model.head(torch.cat([student_tokens[:, 0], local_tokens[:, 0]])).chunk(4)
    probs = F.softmax((teacher_cls - center) / tau_t, dim=-1).chunk(2)
    pairs = [(g, v) for g in range(2) for v in range(4) if v != g]
    cls_loss = sum(-(probs[g] * F.log_softmax(student_cls[v] / tau_s, dim=-1)).sum(-1).mean() for g, v in pairs) / 6
    patch_loss = slow_patch_loss(patch_head(student_tokens[:, 1:]), F.softmax((teacher_patch - patch_center) / tau_p, -1),
                                 mask, tau_s)
    torch.testing.assert_close(logged["train/cls_loss"], cls_loss.detach(), **CLOSE)
    torch.testing.assert_close(logged["train/patch_loss"], patch_loss.detach(), **CLOSE)
    expected = cls_loss + patch_loss
    torch.testing.assert_close(out["loss"], expected, **CLOSE)
    params = [p for p in model.parameters() if p.requires_grad]
    for param, grad in zip(params, torch.autograd.grad(expected, params, allow_unused=True)):
        grad = torch.zeros_like(param) if grad is None else grad
        actual = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(actual, grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()) + 1e-8)
    assert model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for m in teachers for p in m.parameters())  # no gradient into the teacher
    torch.testing.assert_close(model.center, 0.9 * center + 0.1 * teacher_cls.mean(dim=0, keepdim=True))
    torch.testing.assert_close(model.patch_center, 0.9 * patch_center + 0.1 * teacher_patch.flatten(0, 1).mean(0, True))
    torch.testing.assert_close(out["features"], vit.pool(student_tokens[:4]).detach())


def test_teacher_outputs_at_unmasked_patches_do_not_change_the_loss() -> None:
    views = fixed_views(4, 16, num_views=2, seed=3)["views"]
    losses, centers = [], []
    for noise in (0.0, 5.0):
        model = tiny_ibot(mask_probability=1.0)
        drawn = record_masks(model)

        def perturb(module: nn.Module, args: Any, output: torch.Tensor, noise: float = noise) -> torch.Tensor:
            if output.ndim == 3:  # the patch outputs (2B, N, K): change those of the unmasked patches
                unmasked = ~drawn[-1].mask
                output = output + noise * unmasked[..., None] * torch.randn_like(output)
            return output

        model.teacher_head.register_forward_hook(perturb)
        out, logged = run_training_step(model, {"views": views, "label": torch.zeros(4).long()})
        losses.append(logged["train/patch_loss"])
        centers.append(model.patch_center.clone())
    assert losses[0] > 0
    torch.testing.assert_close(losses[0], losses[1])
    assert not torch.allclose(centers[0], centers[1])  # the center does see every patch


def test_masks_come_from_the_step_generator_and_start_at_mask_start_epoch() -> None:
    model = tiny_ibot(mask_start_epoch=1, mask_seed=11)
    drawn = record_masks(model)
    views = fixed_views(4, 16, num_views=2)["views"]
    batch = {"views": views, "label": torch.zeros(4).long()}
    run_training_step(model, batch, current_epoch=0)
    assert drawn[-1].mask.sum() == 0 and drawn[-1].rows.numel() == 0
    for step, micro, rank in [(3, 1, 0), (3, 1, 1)]:
        run_training_step(model, batch, batch_idx=micro, current_epoch=1, global_step=step, accumulate_grad_batches=2,
                          global_rank=rank)
        expected = blockwise_mask(8, (4, 4), (0.1, 0.5), 0.5, step_generator(torch.device("cpu"), 11, rank, step, micro))
        assert torch.equal(drawn[-1].mask, expected)
        assert torch.equal(drawn[-1].rows, expected.flatten().nonzero().squeeze(1))
        torch.testing.assert_close(drawn[-1].weights, masked_patch_weights(expected)[expected])


# --- the centers on 2 processes --------------------------------------------------------------------------------


def _steps_on_ranks(rank: int, world_size: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = tiny_ibot(shared_head=False, patch_out_dim=24)
    batches = [fixed_views(8, 16, num_views=2, num_local=1, local_size=8, seed=s)["views"] for s in (0, 1)]
    rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    centers = []
    for step, views in enumerate(batches):
        run_training_step(model, {"views": [v[rows] for v in views], "label": torch.zeros(8 // world_size).long()},
                          global_step=step, global_rank=rank, world_size=world_size)
        centers.append((model.center.clone(), model.patch_center.clone()))
    return {"centers": centers}


def test_centers_on_two_processes_equal_one_process_on_the_full_batch() -> None:
    """Both centers are EMAs of the teacher's mean over the GLOBAL batch ([CLS]: every global crop; patches: every
    patch of every global crop), whatever the masks (which differ per rank)."""
    two = run_distributed(_steps_on_ranks, 2)["centers"]
    one = _steps_on_ranks(0, 1)["centers"]
    for (center_2, patch_2), (center_1, patch_1) in zip(two, one):
        assert center_1.abs().sum() > 0 and patch_1.abs().sum() > 0
        torch.testing.assert_close(center_2, center_1)
        torch.testing.assert_close(patch_2, patch_1)


# --- the EMA teacher in a fit ----------------------------------------------------------------------------------


class Snapshots(Callback):
    """Student and teacher weights at the start of every batch and at the end, with the step counter."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, torch.Tensor]]] = []

    def _record(self, trainer: Trainer, model: IBOT) -> None:
        self.records.append((trainer.global_step, {k: v.detach().clone() for k, v in model.state_dict().items()}))

    def on_train_batch_start(self, trainer: Trainer, model: IBOT, batch: Any, batch_idx: int) -> None:
        self._record(trainer, model)

    def on_train_end(self, trainer: Trainer, model: IBOT) -> None:
        self._record(trainer, model)


def test_teacher_is_an_ema_updated_once_per_optimizer_step(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    model = tiny_ibot(shared_head=False, patch_out_dim=24, base_momentum=0.9, momentum_schedule="constant",
                      freeze_last_layer_epochs=0)
    assert {type(c) for c in model.configure_callbacks()} == {MomentumUpdate}
    data = SyntheticData(num_samples=32, batch_size=8, image_size=16, num_workers=0, seed=0,
                         views=SimCLRViews(16, num_local=2, local_size=8))
    snapshots = Snapshots()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2, logger=False,
                      limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[snapshots])
    trainer.fit(model, data)
    pairs = [("backbone.", "teacher_backbone."), ("head.", "teacher_head."), ("patch_head.", "teacher_patch_head.")]
    params = {name for name, p in model.named_parameters()}
    updates, checked = 0, set()
    for (step, before), (next_step, after) in zip(snapshots.records, snapshots.records[1:]):
        stepped = next_step > step
        updates += stepped
        for online, target in pairs:
            for key in (k for k in before if k.startswith(target) and k.replace(target, online, 1) in params):
                student = after[key.replace(target, online, 1)]
                expected = 0.9 * before[key] + 0.1 * student if stepped else before[key]
                torch.testing.assert_close(after[key], expected, msg=f"{key} after step {step}->{next_step}")
                checked.add(target)
    assert updates == 2 and len(snapshots.records) == 5 and checked == {target for _, target in pairs}
    first, last = snapshots.records[0][1], snapshots.records[-1][1]
    for key in ("teacher_backbone.model.blocks.0.attn.qkv.weight", "teacher_head.mlp.0.weight",
                "teacher_patch_head.mlp.0.weight"):
        assert not torch.equal(first[key], last[key]), key
    assert not torch.equal(first["mask_token"], last["mask_token"])  # the mask token is trained
    assert all(not p.requires_grad and p.grad is None for m in (model.teacher_backbone, model.teacher_head,
                                                                model.teacher_patch_head) for p in m.parameters())


# --- bad settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}}, "IBOT needs a ViT backbone .*cifar_resnet18"),
        ({"mask_ratio": (0.0, 0.5)}, r"mask_ratio must be a range .* got \(0.0, 0.5\)"),
        ({"mask_ratio": (0.1, 1.0)}, r"mask_ratio must be a range .* got \(0.1, 1.0\)"),
        ({"mask_ratio": (0.5, 0.2)}, r"mask_ratio must be a range .* got \(0.5, 0.2\)"),
        ({"mask_probability": 0.0}, "mask_probability must lie in"),
        ({"global_crops": 1}, "global_crops must be >= 2"),
        ({"shared_head": True, "patch_out_dim": 16}, "shared_head=True needs patch_out_dim == out_dim"),
        ({"backbone_kwargs": {**VIT["backbone_kwargs"], "class_token": False, "global_pool": "avg"}}, "class_token=true"),
        ({"backbone_kwargs": {**VIT["backbone_kwargs"], "image_size": 18}}, "image_size 18 is not divisible"),
    ],
)
def test_bad_settings_fail_when_built_with_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        tiny_ibot(**kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("views", "message"),
    [
        (SimCLRViews(16, num_views=1), "set data.views.num_views=2, got 1"),
        (SimCLRViews(18), "data.views.size=18 is not divisible by the patch size 4"),
        (SimCLRViews(16, num_local=2, local_size=6), "data.views.local_size=6 is not divisible by the patch size 4"),
    ],
)
def test_bad_data_settings_fail_at_setup(views: SimCLRViews, message: str) -> None:
    model = tiny_ibot()
    model._trainer = type("StubTrainer", (), {"datamodule": type("Data", (), {"views": views})()})()
    with pytest.raises(ValueError, match=message) as error:
        model.setup("fit")
    assert "\n" not in str(error.value)
