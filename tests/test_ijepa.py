"""I-JEPA (Assran et al. 2023): the multi-block sampler, the loss and the layer-normed targets against slow
references, the context encoder's blindness to the other patches, the step's wiring, the target encoder's EMA and
the one-line errors. I-JEPA takes no statistic across the batch (its loss is a mean over images), so it has no
2-process check of its own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

from ssl_lightning.callbacks.momentum import MomentumUpdate
from ssl_lightning.losses.ijepa import ijepa_loss, layer_normed_targets
from ssl_lightning.methods.ijepa import IJEPA
from ssl_lightning.nn.masking import step_generator
from ssl_lightning.nn.masking.multiblock import multiblock_masks
from ssl_lightning.nn.pos_embed import sincos_pos_embed_2d
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests.tiny_methods import one_thread, tiny_data, tiny_trainer  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

VIT = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
       "class_token": False, "global_pool": "avg", "fc_norm": False}
TARGET_SCALE, TARGET_ASPECT, CONTEXT_SCALE = (0.15, 0.2), (0.75, 1.5), (0.85, 1.0)


def tiny_ijepa(**kwargs: Any) -> IJEPA:
    torch.manual_seed(0)
    args: dict[str, Any] = {"backbone": "vit_tiny", "backbone_kwargs": VIT, "predictor_dim": 16, "predictor_depth": 1,
                            "predictor_num_heads": 2, "min_context": 2,
                            "optim": OptimConfig(name="adamw", lr=1e-3, weight_decay=0.04, warmup_epochs=0)}
    return IJEPA(**{**args, **kwargs})


def cells(indices: torch.Tensor, cols: int) -> set[tuple[int, int]]:
    return {divmod(int(i), cols) for i in indices}


def rectangle(block: set[tuple[int, int]]) -> tuple[int, int]:
    """(height, width) of a set of cells that must fill its bounding box exactly."""
    rows, cols = [r for r, _ in block], [c for _, c in block]
    height, width = max(rows) - min(rows) + 1, max(cols) - min(cols) + 1
    assert len(block) == height * width, f"block {sorted(block)} is not a full rectangle"
    return height, width


def assert_size_in_range(height: int, width: int, num_patches: int, scale: tuple[float, float],
                         aspect: tuple[float, float]) -> None:
    """Up to rounding to whole patches: height = round(sqrt(A * a)), width = round(sqrt(A / a)) for some area
    A = num_patches * s with s in ``scale`` and some aspect a in ``aspect``."""
    assert (height - 0.5) * (width - 0.5) <= num_patches * scale[1] + 1e-9, (height, width)
    assert (height + 0.5) * (width + 0.5) >= num_patches * scale[0] - 1e-9, (height, width)
    assert (height - 0.5) / (width + 0.5) <= aspect[1] and (height + 0.5) / (width - 0.5) >= aspect[0], (height, width)


def test_sampler_blocks_counts_and_no_overlap_against_a_slow_reconstruction() -> None:
    rows = cols = 14
    seen_sizes, seen_context = set(), set()
    for seed in range(12):
        masks = multiblock_masks(6, (rows, cols), step_generator(torch.device("cpu"), seed, 0, 0), num_targets=4)
        assert masks.context.shape[0] == 6 and masks.context.dtype == torch.long
        assert masks.targets.shape == (6, 4, masks.target_size[0] * masks.target_size[1])
        seen_sizes.add(masks.target_size)
        seen_context.add(masks.context_size)
        context_side = masks.context_size[0]
        assert masks.context_size == (context_side, context_side)  # square context block
        assert_size_in_range(context_side, context_side, rows * cols, CONTEXT_SCALE, (1.0, 1.0))
        for image in range(6):
            context = cells(masks.context[image], cols)
            assert len(context) == masks.context.shape[1] >= 10  # distinct patches; min_context (10) held
            r, c = zip(*context)  # inside one context block
            assert max(r) - min(r) < context_side and max(c) - min(c) < context_side
            for block in range(4):
                target = cells(masks.targets[image, block], cols)
                height, width = rectangle(target)
                assert (height, width) == masks.target_size  # the same size for every block of the batch
                assert_size_in_range(height, width, rows * cols, TARGET_SCALE, TARGET_ASPECT)
                assert not context & target, f"image {image}: context overlaps target block {block}"
        assert not torch.equal(masks.targets[0], masks.targets[1]) and not torch.equal(masks.context[0], masks.context[1])
    assert len(seen_sizes) > 1 and len(seen_context) > 1  # sizes are drawn, once per batch

    again = multiblock_masks(6, (rows, cols), step_generator(torch.device("cpu"), 11, 0, 0), num_targets=4)
    assert torch.equal(again.context, masks.context) and torch.equal(again.targets, masks.targets)


def test_blocks_reach_the_last_row_and_column_and_contexts_are_cut_at_random() -> None:
    rows = cols = 8
    covered = torch.zeros(rows * cols)
    truncated_like_the_reference = cut = 0
    for seed in range(20):
        masks = multiblock_masks(8, (rows, cols), step_generator(torch.device("cpu"), seed), min_context=1)
        covered.index_add_(0, masks.targets.flatten(), torch.ones(masks.targets.numel()))
        keep = masks.context.shape[1]
        assert keep == int(masks.full_context.sum(dim=1).min())  # the batch's fewest
        for image in range(8):
            full = [p for p in range(rows * cols) if masks.full_context[image, p]]
            kept = masks.context[image].tolist()
            assert set(kept) <= set(full) and set(full).isdisjoint(masks.targets[image].flatten().tolist())
            if len(full) > keep:
                cut += 1
                truncated_like_the_reference += kept == full[:keep]
    grid = covered.view(rows, cols)
    assert grid[-1].min() > 0 and grid[:, -1].min() > 0  # the last row and column are reachable
    assert cut > 20 and truncated_like_the_reference < cut / 2  # not the reference's raster-order truncation


def test_the_context_safeguard_keeps_min_context_and_fails_in_one_line_when_impossible() -> None:
    grid = (6, 6)  # 4 targets of 7-9 of 36 patches leave small contexts
    plain = [multiblock_masks(16, grid, step_generator(torch.device("cpu"), s), min_context=1, tries=1,
                              target_scale=(0.25, 0.25)).context.shape[1] for s in range(20)]
    guarded = [multiblock_masks(16, grid, step_generator(torch.device("cpu"), s), min_context=8, tries=20,
                                target_scale=(0.25, 0.25)).context.shape[1] for s in range(20)]
    assert min(plain) < 8 <= min(guarded)
    with pytest.raises(ValueError, match="context keeps no patch") as err:
        multiblock_masks(4, grid, step_generator(torch.device("cpu"), 0), target_scale=(1.0, 1.0))
    assert "\n" not in str(err.value)


def slow_layer_norm(x: torch.Tensor) -> torch.Tensor:
    mean = sum(x.tolist()) / x.numel()
    var = sum((v - mean) ** 2 for v in x.tolist()) / x.numel()
    return (x - mean) / math.sqrt(var + 1e-5)


def test_loss_and_layer_normed_targets_match_the_papers_formula_one_patch_at_a_time() -> None:
    torch.manual_seed(0)
    batch, blocks, per_block, dim, patches = 3, 4, 5, 6, 16
    tokens = torch.randn(batch, patches, dim) * 3 + 1
    indices = torch.randint(0, patches, (batch, blocks, per_block))
    targets = layer_normed_targets(tokens, indices)
    predictions = torch.randn(batch, blocks, per_block, dim, requires_grad=True)
    expected = 0.0
    for b in range(batch):
        per_image = 0.0
        for i in range(blocks):  # (1 / M) sum_i sum_{j in B_i} ||s_hat_j - s_j||^2
            for j in range(per_block):
                target = slow_layer_norm(tokens[b, indices[b, i, j]].double())
                torch.testing.assert_close(targets[b, i, j].double(), target, atol=1e-5, rtol=1e-5)
                per_image += float(((predictions[b, i, j].detach().double() - target) ** 2).sum())
        expected += per_image / blocks
    loss = ijepa_loss(predictions, targets)
    torch.testing.assert_close(loss.double(), torch.tensor(expected / batch, dtype=torch.float64))
    loss.backward()  # d/dp of the squared distance: 2 (p - t) / (M B)
    torch.testing.assert_close(predictions.grad, 2 * (predictions.detach() - targets) / (blocks * batch))
    with pytest.raises(ValueError, match="ijepa_loss"):
        ijepa_loss(predictions[:, :2], targets)


def test_the_context_encoder_never_sees_the_other_patches() -> None:
    model = tiny_ijepa().eval()
    images = torch.randn(4, 3, 16, 16)
    masks = model.sample_masks(images, step_generator(torch.device("cpu"), 0))
    changed, context_changed = images.clone(), images.clone()
    for image in range(4):
        context = set(masks.context[image].tolist())
        for patch in range(16):
            row, col = divmod(patch, 4)
            pixels = (image, slice(None), slice(4 * row, 4 * row + 4), slice(4 * col, 4 * col + 4))
            if patch not in context:  # the target patches and every other non-context patch
                changed[pixels] = torch.randn(3, 4, 4) * 10
        row, col = divmod(int(masks.context[image, 0]), 4)
        context_changed[image, :, 4 * row: 4 * row + 4, 4 * col: 4 * col + 4] += 5.0
    out = model.encode_context(images, masks.context)
    assert out.shape == (4, masks.context.shape[1], 32)
    torch.testing.assert_close(model.encode_context(changed, masks.context), out)
    assert not torch.allclose(model.encode_context(context_changed, masks.context), out)


def test_training_step_is_the_loss_of_its_parts_with_fixed_positions() -> None:
    model = tiny_ijepa()
    assert not model.backbone.model.pos_embed.requires_grad and model.backbone.model.cls_token is None
    torch.testing.assert_close(model.backbone.model.pos_embed[0], sincos_pos_embed_2d(32, 4))
    batch = fixed_views(4, 16, num_views=1)
    with torch.no_grad():
        model.target_backbone.model.blocks[0].mlp.fc2.weight.add_(torch.randn(32, 128) * 0.1)  # differs from the student
    out, logged = run_training_step(model, batch, batch_idx=0)

    images = batch["views"][0]
    masks = model.sample_masks(images, step_generator(torch.device("cpu"), model.mask_seed, 0, 0, 0))
    context = model.encode_context(images, masks.context)
    predictions = model.predictor(context, masks.context, masks.targets)
    with torch.no_grad():  # the target encoder on the full image, then a slow layer norm and selection
        full = model.target_backbone.model.forward_features(images)
    expected, blocks = 0.0, masks.targets.shape[1]
    for b in range(4):
        for i in range(blocks):
            for j, patch in enumerate(masks.targets[b, i].tolist()):
                target = slow_layer_norm(full[b, patch].double())
                expected += float(((predictions[b, i, j].detach().double() - target) ** 2).sum()) / blocks / 4
    torch.testing.assert_close(out["loss"].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logged["train/loss"], out["loss"].detach())
    assert logged["train/context_patches"] == masks.context.shape[1]
    torch.testing.assert_close(out["features"], context.mean(dim=1))
    assert not out["features"].requires_grad
    # forward(images) is the full image's mean normed patch token
    torch.testing.assert_close(model(images), model.backbone.encode(model.backbone.embed(images)).mean(dim=1))


class _Record(Callback):
    """Per batch: did the target encoder change, by the EMA of the online weights after the step? Compared at the
    next batch's start (and at the end of training), after every callback's batch end."""

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self.ema_ok: list[bool] = []
        self.grads: list[bool] = []
        self.before: list[torch.Tensor] | None = None

    def _compare(self, trainer, pl_module) -> None:
        if self.before is not None:
            after, online = list(pl_module.target_backbone.parameters()), list(pl_module.backbone.parameters())
            self.changed.append(any(not torch.equal(a, b) for a, b in zip(after, self.before)))
            if self.changed[-1]:
                momentum = trainer.callback_metrics["train/momentum"].item()
                self.ema_ok.append(all(torch.allclose(a, momentum * b + (1 - momentum) * o, atol=1e-6)
                                       for a, b, o in zip(after, self.before, online)))
        self.before = [p.detach().clone() for p in pl_module.target_backbone.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._compare(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._compare(trainer, pl_module)

    def on_after_backward(self, trainer, pl_module) -> None:
        self.grads.append(any(p.grad is not None for p in pl_module.target_backbone.parameters()))


def test_target_encoder_gets_no_gradient_and_one_ema_update_per_optimizer_step(tmp_path: Path) -> None:
    model = tiny_ijepa(base_momentum=0.9, final_weight_decay=0.4)
    (callback,) = model.configure_callbacks()
    assert isinstance(callback, MomentumUpdate) and callback.pairs == [("backbone", "target_backbone")]
    assert all(not p.requires_grad for p in model.target_backbone.parameters())
    record = _Record()
    data = tiny_data(num_samples=32, batch_size=8, views=SimCLRViews(16, num_views=1))
    trainer = tiny_trainer(tmp_path, max_steps=2, accumulate=2, callbacks=[record])
    trainer.fit(model, data)
    assert record.grads == [False] * 4
    assert record.changed == [False, True, False, True]  # once per optimizer step, not per batch
    assert record.ema_ok == [True, True]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.target_backbone.parameters()}
    assert id(model.backbone.model.pos_embed) not in optimized


def test_bad_settings_fail_in_one_line_when_built() -> None:
    cases = [
        ({"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}}, "IJEPA needs a ViT backbone"),
        ({"target_scale": (0.0, 0.2)}, r"target_scale must be an increasing pair in \(0, 1.0\]"),
        ({"target_scale": (0.3, 0.2)}, "target_scale must be"),
        ({"context_scale": (0.85, 1.2)}, "context_scale must be"),
        ({"target_aspect": (-1.0, 1.5)}, "target_aspect must be"),
        ({"num_targets": 0}, "num_targets must be at least 1, got 0"),
        ({"backbone_kwargs": {**VIT, "image_size": 18}}, "image_size 18 is not divisible by patch_size 4"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            tiny_ijepa(**kwargs)
        assert "\n" not in str(err.value), kwargs
    model = tiny_ijepa()
    model._trainer = type("T", (), {"datamodule": tiny_data(views=SimCLRViews(18, num_views=1))})()
    with pytest.raises(ValueError, match="data.views.size=18 is not divisible by the patch size 4"):
        model.setup("fit")
    with pytest.raises(ValueError, match="single crops of one size"):
        run_training_step(tiny_ijepa(), fixed_views(2, 16, num_views=1, num_local=1, local_size=8))
