"""AIM (El-Nouby et al. 2024): the prefix-causal mask against its loop definition, the next-patch loss against a
slow reference, causality of the predictions (and bidirectional evaluation), per-image prefix lengths drawn from
the step's generator, the training step recomputed from its parts, and one-line errors for bad settings."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import ssl_lightning.methods.aim as aim_module
from ssl_lightning.losses.aim import aim_loss
from ssl_lightning.methods.aim import AIM
from ssl_lightning.nn import AIMHead
from ssl_lightning.nn.masking import step_generator
from ssl_lightning.nn.masking.prefix import prefix_causal_mask, random_prefix_lengths
from ssl_lightning.nn.pos_embed import sincos_pos_embed_2d
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews
from tests.test_method_wiring_others import assert_same_gradients, capture_output, trainable
from tests.tiny_methods import one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step, stub_trainer

VIT = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "class_token": False,
       "global_pool": "avg", "fc_norm": False}
N, P = 16, 4 * 4 * 3  # patches of a 16 px image at patch 4, pixels per patch
CPU = torch.device("cpu")


def tiny_aim(**kwargs: Any) -> AIM:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(backbone="vit_tiny", backbone_kwargs=VIT, head_dim=16, head_blocks=2, prefix_seed=7,
                                optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95)))
    return AIM(**{**args, **kwargs})


def loop_mask(prefix_lengths: list[int], length: int) -> torch.Tensor:
    """Query i may attend to key j iff j < prefix or j <= i."""
    mask = torch.zeros(len(prefix_lengths), 1, length, length, dtype=torch.bool)
    for b, prefix in enumerate(prefix_lengths):
        for i in range(length):
            for j in range(length):
                mask[b, 0, i, j] = j < prefix or j <= i
    return mask


def slow_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """Patch n = (row, column) in raster order; inside a patch the pixels as (row, column, channel)."""
    b, c, h, w = images.shape
    out = torch.empty(b, (h // p) * (w // p), p * p * c)
    for s in range(b):
        for row in range(h // p):
            for col in range(w // p):
                out[s, row * (w // p) + col] = images[s, :, row * p:(row + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).flatten()
    return out


def slow_aim_loss(pred: torch.Tensor, patches: torch.Tensor, prefix: list[int], norm_pix: bool) -> torch.Tensor:
    """The paper's loss one image and one patch at a time: token k-1 predicts patch k; per image the mean over the
    non-prefix patches k = S .. N-1 of the squared error per pixel (targets normalized per patch), then the mean
    over the images."""
    total = 0.0
    for b in range(patches.shape[0]):
        errors = []
        for k in range(prefix[b], patches.shape[1]):
            t = patches[b, k].double()
            if norm_pix:
                mean = t.sum() / t.numel()
                t = (t - mean) / math.sqrt(float(((t - mean) ** 2).sum()) / (t.numel() - 1) + 1e-6)
            errors.append(float(((pred[b, k - 1].detach().double() - t) ** 2).sum()) / t.numel())
        total += sum(errors) / len(errors)
    return torch.tensor(total / patches.shape[0], dtype=torch.float64)


def test_prefix_mask_matches_the_loop_definition_and_lengths_are_drawn_per_image() -> None:
    prefix = [1, 4, 15, 7]
    assert torch.equal(prefix_causal_mask(torch.tensor(prefix), N), loop_mask(prefix, N))
    lengths = random_prefix_lengths(4096, N, step_generator(CPU, 0, 0, 0, 0), CPU)
    assert lengths.shape == (4096,) and int(lengths.min()) == 1 and int(lengths.max()) == N - 1  # uniform in [1, N-1]
    assert torch.bincount(lengths, minlength=N)[1:].min() > 4096 / (N - 1) / 2
    assert torch.equal(lengths, random_prefix_lengths(4096, N, step_generator(CPU, 0, 0, 0, 0), CPU))
    with pytest.raises(ValueError, match="at least 2 patches"):
        random_prefix_lengths(2, 1, torch.Generator(), CPU)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_next_patch_mse_on_non_prefix_patches_only(norm_pix: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    patches = torch.randn(4, N, P, generator=generator) * 2 + 1
    pred = torch.randn(4, N - 1, P, generator=generator, requires_grad=True)
    prefix = [1, 4, 15, 7]
    loss = aim_loss(pred, patches, torch.tensor(prefix), norm_pix)
    torch.testing.assert_close(loss.double(), slow_aim_loss(pred.detach(), patches, prefix, norm_pix), rtol=1e-5, atol=1e-6)
    loss.backward()
    for b in range(4):  # predictions of prefix patches (token i predicts patch i + 1) get no gradient
        for i in range(N - 1):
            assert bool((pred.grad[b, i] != 0).any()) == (i + 1 >= prefix[b]), (b, i)
    with pytest.raises(ValueError, match="without the first patch"):
        aim_loss(pred.detach()[:, :-1], patches, torch.tensor(prefix))


@pytest.mark.parametrize("fused", [True, False])
def test_timm_blocks_take_a_batched_per_image_mask(fused: bool) -> None:
    """TimmViT.encode passes the (B, 1, L, L) bool mask to every timm block: fused (SDPA) and unfused attention
    give, for each image, what that image gives alone under its own (L, L) mask."""
    model = tiny_aim(backbone_kwargs={**VIT, "reg_tokens": 2}).eval()
    for block in model.backbone.model.blocks:
        block.attn.fused_attn = fused
    tokens = model.backbone.embed(torch.randn(3, 3, 16, 16))
    mask = prefix_causal_mask(torch.tensor([3, 9, 17]), tokens.shape[1])
    batched = model.backbone.encode(tokens, mask)
    for b in range(3):
        torch.testing.assert_close(batched[b:b + 1], model.backbone.encode(tokens[b:b + 1], mask[b, 0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_predictions_of_earlier_positions_ignore_later_patches(reg_tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Change patch k = 9 of every image: with prefix S <= 9 the head's outputs at positions i < 9 (predicting
    patches 1..9) do not move and those at i >= 9 do; with S > 9 the patch is in the prefix and every output moves
    (the prefix is bidirectional). Register tokens belong to the prefix. Evaluation (``forward``) is bidirectional:
    every patch's output moves."""
    model = tiny_aim(backbone_kwargs={**VIT, "reg_tokens": reg_tokens}).eval()
    prefix = torch.tensor([1, 5, 9, 10, 15])
    monkeypatch.setattr(aim_module, "random_prefix_lengths", lambda *args: prefix)
    head_outputs = capture_output(model.head)
    images = torch.randn(5, 3, 16, 16)
    changed = images.clone()
    changed[:, :, 8:12, 4:8] += torch.randn(5, 3, 4, 4) * 3  # patch 9: row 2, column 1
    with torch.no_grad():
        model.autoregressive_loss(images, torch.Generator())
        model.autoregressive_loss(changed, torch.Generator())
        tokens, tokens_changed = (model.backbone.encode(model.backbone.embed(x)) for x in (images, changed))
    before, after = head_outputs  # (5, N - 1, P): position i predicts patch i + 1
    moved = (before - after).abs().amax(dim=-1) > 1e-5
    for b, s in enumerate(prefix.tolist()):
        expected = [i >= 9 or s > 9 for i in range(N - 1)]
        assert moved[b].tolist() == expected, (b, s)
    assert ((tokens - tokens_changed).abs().amax(dim=-1) > 1e-5).all()  # bidirectional: every token moves
    torch.testing.assert_close(model(images), tokens[:, reg_tokens:].mean(dim=1))


def test_training_step_recomputed_from_its_parts() -> None:
    """Prefix lengths from the step's generator keyed by (prefix_seed, rank, step, micro-batch), the loop mask,
    the blocks, sin-cos positions before the head, the slow loss; the same gradients; features = mean patch token."""
    model = tiny_aim()
    batch = fixed_views(4, 16, num_views=1)
    images = batch["views"][0]
    out, logged = run_training_step(model, batch, batch_idx=3, global_step=5, global_rank=1, accumulate_grad_batches=2)
    out["loss"].backward()

    prefix = torch.randint(1, N, (4,), generator=step_generator(CPU, 7, 1, 5, 1)).tolist()
    vit = model.backbone.model
    tokens = vit.patch_embed(images).flatten(1, 2) + vit.pos_embed  # no class token: positions of the 16 patches
    for block in vit.blocks:
        tokens = block(tokens, attn_mask=loop_mask(prefix, N))
    tokens = vit.norm(tokens)
    pred = model.head(tokens[:, :-1] + sincos_pos_embed_2d(32, 4)[:-1])
    expected = slow_aim_loss(pred, slow_patches(images, 4), prefix, norm_pix=True)
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["train/loss"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["features"], tokens.mean(dim=1).detach())
    differentiable = aim_loss(pred, slow_patches(images, 4), torch.tensor(prefix))
    assert_same_gradients(differentiable, trainable(model))


def test_prefix_lengths_come_from_the_step_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per image, different at each step, micro-batch and rank, the same again for the same key (exact resume)."""
    drawn: list[torch.Tensor] = []
    original = aim_module.random_prefix_lengths
    monkeypatch.setattr(aim_module, "random_prefix_lengths", lambda *args: drawn.append(original(*args)) or drawn[-1])
    model = tiny_aim()
    batch = fixed_views(8, 16, num_views=1)
    keys = [dict(global_step=0), dict(global_step=0), dict(global_step=1), dict(global_step=0, global_rank=1)]
    losses = [run_training_step(model, batch, **key)[0]["loss"] for key in keys]
    assert len(drawn) == 4 and len(set(drawn[0].tolist())) > 1  # drawn per image
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(losses[0], losses[1])
    assert not torch.equal(drawn[0], drawn[2]) and not torch.equal(drawn[0], drawn[3])
    run_training_step(model, batch, batch_idx=1, accumulate_grad_batches=2)  # the second micro-batch of step 0
    assert not torch.equal(drawn[0], drawn[4])


def test_bad_settings_fail_in_one_line() -> None:
    cases = [
        (dict(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}), "AIM needs a ViT backbone .*cifar_resnet18"),
        (dict(backbone="mae_vit_tiny", backbone_kwargs={}), "AIM needs a ViT backbone .*mae_vit_tiny"),
        (dict(backbone_kwargs={"image_size": 16, "patch_size": 4}), "set backbone_kwargs class_token: false, global_pool: avg"),
        (dict(backbone_kwargs={**VIT, "class_token": True}), "class_token=True"),
        (dict(backbone_kwargs={**VIT, "global_pool": "token"}), "global_pool='token'"),
        (dict(backbone_kwargs={**VIT, "image_size": 18}), "image_size 18 is not divisible by patch_size 4"),
        (dict(head_blocks=-1), "head_blocks=-1"),
        (dict(backbone_kwargs={**VIT, "embed_dim": 30}), "embed_dim divisible by 4, got 30"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            tiny_aim(**kwargs)
        assert "\n" not in str(error.value)
    model = tiny_aim()
    for views, message in [(SimCLRViews(18, num_views=1), "data.init_args.views.size=18 is not divisible by the patch size 4"),
                           (SimCLRViews(16, num_views=1, num_local=2, local_size=8), "views.num_local: 0 \\(got 2\\)")]:
        model._trainer = stub_trainer(datamodule=SimpleNamespace(views=views))
        with pytest.raises(ValueError, match=message):
            model.setup("fit")
    model._trainer = None


def aim_head_by_loop(head: AIMHead, tokens: torch.Tensor) -> torch.Tensor:
    """Section 3's MLP head written out token by token: x = W_in t; x += W2 GELU(W1 LN(x)) per block; W_out LN(x)."""
    out = torch.empty(*tokens.shape[:-1], head.proj_out.out_features, dtype=tokens.dtype)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in tokens.shape[:-1])):
        x = head.proj_in.weight @ tokens[tuple(index)]
        for norm, fc1, _, fc2 in head.blocks:
            normed = torch.nn.functional.layer_norm(x, x.shape, norm.weight, norm.bias, norm.eps)
            x = x + fc2.weight @ torch.nn.functional.gelu(fc1.weight @ normed)
        normed = torch.nn.functional.layer_norm(x, x.shape, head.norm.weight, head.norm.bias, head.norm.eps)
        out[tuple(index)] = head.proj_out.weight @ normed
    return out


def test_aim_head_is_the_papers_residual_mlp_applied_to_every_token_alone() -> None:
    torch.manual_seed(0)
    head = AIMHead(in_dim=6, out_dim=5, dim=8, num_blocks=2, mlp_ratio=2.0)
    assert [tuple(m.weight.shape) for m in head.modules() if isinstance(m, torch.nn.Linear)] == \
        [(8, 6), (16, 8), (8, 16), (16, 8), (8, 16), (5, 8)]
    assert all(m.bias is None for m in head.modules() if isinstance(m, torch.nn.Linear))
    tokens = torch.randn(2, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(head(tokens), aim_head_by_loop(head, tokens), rtol=1e-5, atol=1e-5)
