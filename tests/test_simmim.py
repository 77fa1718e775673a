"""SimMIM (Xie et al. 2022): the masked L1 against a loop over pixels, coarse masks against loops over mask
patches, the method's training step recomputed from its parts for a ViT and a ResNet, masked pixels never
reaching the encoder, and one-line errors for bad settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ssl_lightning.losses.simmim import simmim_loss
from ssl_lightning.methods.simmim import SimMIM
from ssl_lightning.nn.masking import step_generator
from ssl_lightning.nn.masking.coarse import coarse_random_mask, upsample_mask
from ssl_lightning.transforms import SimCLRViews
from tests.tiny_methods import one_thread  # noqa: F401 (autouse fixture)
from tests.wiring_utils import fixed_views, run_training_step

VIT = {"backbone": "vit_tiny", "backbone_kwargs": {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                                   "num_heads": 2}, "mask_patch_size": 8}
RESNET = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}, "mask_patch_size": 8}
CPU = torch.device("cpu")


def slow_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's code, one pixel at a time: sum of |pred - target| over masked pixels and channels, divided
    by (the number of masked pixels + 1e-5) and by the number of channels."""
    total, pixels = torch.zeros((), dtype=torch.float64), 0
    images, channels, height, width = pred.shape
    for b in range(images):
        for y in range(height):
            for x in range(width):
                if mask[b, y, x]:
                    pixels += 1
                    for c in range(channels):
                        total += abs(float(pred[b, c, y, x]) - float(target[b, c, y, x]))
    return total / (pixels + 1e-5) / channels


def slow_head(head: torch.nn.Sequential, feature_map: torch.Tensor) -> torch.Tensor:
    """The one-layer head as a loop: each position's linear output, the value for channel c and offset (i, j)
    at index c * s^2 + i * s + j, placed at pixel (row * s + i, col * s + j)."""
    conv = head[0]
    weight, bias = conv.weight[:, :, 0, 0], conv.bias
    stride = int((weight.shape[0] // 3) ** 0.5)
    images, _, rows, cols = feature_map.shape
    out = torch.zeros(images, 3, rows * stride, cols * stride)
    for b in range(images):
        for row in range(rows):
            for col in range(cols):
                values = weight @ feature_map[b, :, row, col] + bias
                for c in range(3):
                    for i in range(stride):
                        for j in range(stride):
                            out[b, c, row * stride + i, col * stride + j] = values[c * stride**2 + i * stride + j]
    return out


def pixel_mask_by_loop(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, rows, cols) -> (B, rows * stride, cols * stride), pixel by pixel."""
    images, rows, cols = mask.shape
    out = torch.zeros(images, rows * stride, cols * stride, dtype=torch.bool)
    for b in range(images):
        for y in range(rows * stride):
            for x in range(cols * stride):
                out[b, y, x] = mask[b, y // stride, x // stride]
    return out


def test_masked_l1_matches_a_loop_and_ignores_visible_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    mask = torch.rand(2, 8, 8, generator=generator) < 0.4
    loss = simmim_loss(pred, target, mask)
    torch.testing.assert_close(loss.double(), slow_l1(pred, target, mask), rtol=1e-6, atol=0)
    visible, hidden = (~mask).nonzero()[0].tolist(), mask.nonzero()[0].tolist()
    changed = pred.clone()
    changed[visible[0], :, visible[1], visible[2]] += 10.0
    assert torch.equal(simmim_loss(changed, target, mask), loss)  # an unmasked pixel does not count
    changed = pred.clone()
    changed[hidden[0], 1, hidden[1], hidden[2]] = target[hidden[0], 1, hidden[1], hidden[2]] + 100.0
    changed_loss = simmim_loss(changed, target, mask)
    assert changed_loss > loss + 0.5  # a masked one does: about 100 / (3 x 46 masked pixels) more
    torch.testing.assert_close(changed_loss.double(), slow_l1(changed, target, mask), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="do not match"):
        simmim_loss(pred, target, mask[:, :4])


def test_coarse_mask_covers_whole_mask_patches_at_the_exact_ratio() -> None:
    generator = step_generator(CPU, 5, 0, 1)
    mask = coarse_random_mask(6, 12, 8, 4, 0.5, generator, CPU)  # 3 x 2 mask patches of 4 x 4 model patches
    assert mask.shape == (6, 12, 8) and mask.dtype == torch.bool
    for image in range(6):
        masked_cells = 0
        for cell_row in range(3):
            for cell_col in range(2):
                block = [bool(mask[image, cell_row * 4 + i, cell_col * 4 + j]) for i in range(4) for j in range(4)]
                assert len(set(block)) == 1  # a mask patch is all masked or all visible
                masked_cells += block[0]
        assert masked_cells == 3  # round(0.5 * 6) in every image
        assert int(mask[image].sum()) == 3 * 16  # exactly half the model patches
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1  # drawn per image
    assert torch.equal(mask, coarse_random_mask(6, 12, 8, 4, 0.5, step_generator(CPU, 5, 0, 1), CPU))
    # the paper's setting: 192 px, 32 px mask patches, 0.6 -> 22 of 36 (its ceil(21.6)); ViT-B/16: 22 x 4 patches
    paper = coarse_random_mask(3, 12, 12, 2, 0.6, generator, CPU)
    assert paper.sum(dim=(1, 2)).tolist() == [22 * 4] * 3
    coarse = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(upsample_mask(coarse, 3), pixel_mask_by_loop(coarse, 3))
    with pytest.raises(ValueError, match="not divisible into 4x4"):
        coarse_random_mask(1, 10, 8, 4, 0.5, generator, CPU)


def _recompute(model: SimMIM, images: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's loss and features rebuilt from the parts: the same generator, masks by the coarse sampler,
    the mask applied by hand (ResNet) or by ``embed`` (ViT), the head and the loss as loops."""
    generator = step_generator(CPU, model.mask_seed, 0, step, 0)
    rows = images.shape[-1] // model.stride
    mask = coarse_random_mask(images.shape[0], rows, rows, 8 // model.stride, 0.6, generator, CPU)
    pixels = pixel_mask_by_loop(mask, model.stride)
    if model.is_vit:
        tokens = model.backbone.encode(model.backbone.embed(images, mask.flatten(1), model.mask_token))
        patches = model.backbone.patch_tokens(tokens)
        feature_map = torch.stack([patches[:, r * rows + c] for r in range(rows) for c in range(rows)], -1)
        feature_map, features = feature_map.unflatten(-1, (rows, rows)), model.backbone.pool(tokens)
    else:
        masked = images.clone()
        for b, y, x in pixels.nonzero().tolist():
            masked[b, :, y, x] = model.mask_token
        feature_map = model.backbone.feature_map(masked)
        features = model.backbone(masked)
    return slow_l1(slow_head(model.head, feature_map), images, pixels), features


@pytest.mark.parametrize("settings", [VIT, RESNET], ids=["vit", "resnet"])
def test_training_step_is_the_masked_l1_of_the_one_layer_head(settings: dict) -> None:
    torch.manual_seed(0)
    model = SimMIM(**settings).eval()  # eval: the ResNet's BatchNorm gives the same output twice
    batch = fixed_views(4, 16, num_views=1)
    out, logged = run_training_step(model, batch, global_step=3)
    with torch.no_grad():
        expected, features = _recompute(model, batch["views"][0], step=3)
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["train/loss"], out["loss"].detach())
    torch.testing.assert_close(out["features"], features.detach())
    assert out["loss"].requires_grad and not out["features"].requires_grad
    out["loss"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    other_step, _ = run_training_step(model, batch, global_step=4)
    assert not torch.equal(other_step["loss"], out["loss"])  # a new mask at every step


@pytest.mark.parametrize("settings", [VIT, RESNET], ids=["vit", "resnet"])
def test_masked_pixels_never_reach_the_encoder(settings: dict) -> None:
    torch.manual_seed(0)
    model = SimMIM(**settings).eval()
    images = torch.randn(3, 3, 16, 16)
    mask = model.draw_mask(images, step_generator(CPU, 0, 1))
    pixels = pixel_mask_by_loop(mask, model.stride)
    assert 0 < int(pixels.sum()) < pixels.numel()
    changed, visible_changed = images.clone(), images.clone()
    for b, y, x in pixels.nonzero().tolist():
        changed[b, :, y, x] = torch.randn(3) * 10
    for b, y, x in (~pixels).nonzero().tolist()[:5]:
        visible_changed[b, :, y, x] += 5.0
    with torch.no_grad():
        feature_map, features = model.encode_masked(images, mask)
        changed_map, changed_features = model.encode_masked(changed, mask)
        torch.testing.assert_close(feature_map, changed_map, rtol=0, atol=0)  # the mask token replaced them
        torch.testing.assert_close(features, changed_features, rtol=0, atol=0)
        assert not torch.allclose(feature_map, model.encode_masked(visible_changed, mask)[0])
        assert not torch.allclose(feature_map, model.encode_masked(changed, torch.zeros_like(mask))[0])


def test_ranks_shards_average_to_the_full_batch_loss() -> None:
    """No statistic spans the batch: every image masks as many pixels, so the mean of equal shards' losses
    (DDP's gradient average) is the full batch's loss."""
    torch.manual_seed(0)
    model = SimMIM(**VIT).eval()
    images, pred = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    mask = upsample_mask(model.draw_mask(images, step_generator(CPU, 0, 2)), 4)
    shards = [simmim_loss(pred[i:i + 2], images[i:i + 2], mask[i:i + 2]) for i in (0, 2)]
    torch.testing.assert_close(sum(shards) / 2, simmim_loss(pred, images, mask), rtol=1e-6, atol=0)


def _one_line_error(match: str, **kwargs: object) -> None:
    with pytest.raises(ValueError, match=match) as error:
        SimMIM(**kwargs)
    assert "\n" not in str(error.value)


def test_bad_settings_fail_in_one_line_when_built() -> None:
    vit_kwargs = VIT["backbone_kwargs"]
    _one_line_error(r"mask_patch_size=6 must be a multiple of the ViT's patch size 4", **{**VIT, "mask_patch_size": 6})
    _one_line_error(r"mask_patch_size=2 must be a multiple of the ViT's patch size 4", **{**VIT, "mask_patch_size": 2})
    _one_line_error(r"backbone_kwargs.image_size=24 is not divisible by mask_patch_size=16",
                    **{**VIT, "backbone_kwargs": {**vit_kwargs, "image_size": 24}, "mask_patch_size": 16})
    _one_line_error(r"mask_patch_size=12 must be a multiple of the backbone's feature_stride 8",
                    **{**RESNET, "mask_patch_size": 12})
    for ratio in (0.0, 1.0, -0.1, 1.5):
        _one_line_error(rf"mask_ratio must lie in \(0, 1\), got {ratio}", **{**VIT, "mask_ratio": ratio})
    _one_line_error(r"SimMIM needs a ViT or a backbone with feature_map\(\)/feature_stride .*mae_vit_tiny",
                    backbone="mae_vit_tiny", backbone_kwargs=vit_kwargs, mask_patch_size=8)


def test_image_and_view_sizes_that_mask_patches_do_not_tile_fail_in_one_line() -> None:
    model = SimMIM(**RESNET)
    with pytest.raises(ValueError, match=r"image size 24x24 \(data.init_args.views.size\) is not divisible by "
                                         r"mask_patch_size=16"):
        SimMIM(**{**RESNET, "mask_patch_size": 16}).draw_mask(torch.zeros(1, 3, 24, 24), torch.Generator())
    for views, match in [(SimCLRViews(20, num_views=1), r"data.init_args.views.size=20 is not divisible by "
                                                        r"mask_patch_size=8"),
                         (SimCLRViews(16, num_views=1, num_local=2, local_size=8), r"views.num_local: 0 \(got 2\)")]:
        model._trainer = SimpleNamespace(datamodule=SimpleNamespace(views=views))
        with pytest.raises(ValueError, match=match) as error:
            model.setup("fit")
        assert "\n" not in str(error.value)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(views=SimCLRViews(16, num_views=1)))
    model.setup("fit")  # 16 px views tile into 8 px mask patches


def test_a_convnext_masks_its_input_and_decodes_from_stride_32() -> None:
    """ConvNeXt (timm), once registered as a backbone with ``feature_map``/``feature_stride``: the same input
    masking and one-layer head at its stride of 32."""
    from ssl_lightning.backbones import BACKBONES

    if "convnext_atto" not in BACKBONES:
        pytest.skip("no convnext_atto backbone registered in ssl_lightning.backbones")
    torch.manual_seed(0)
    model = SimMIM(backbone="convnext_atto", backbone_kwargs={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)},
                   mask_patch_size=32).eval()
    assert model.stride == 32
    images = torch.randn(2, 3, 64, 64)
    mask = model.draw_mask(images, step_generator(CPU, 0, 3))
    pixels = pixel_mask_by_loop(mask, 32)
    changed = torch.where(pixels[:, None], torch.randn(2, 3, 64, 64) * 10, images)
    with torch.no_grad():
        feature_map = model.encode_masked(images, mask)[0]
        torch.testing.assert_close(feature_map, model.encode_masked(changed, mask)[0], rtol=0, atol=0)
        loss = model.masked_loss(images, step_generator(CPU, 0, 3))["loss"]
        torch.testing.assert_close(loss.double(), slow_l1(slow_head(model.head, feature_map), images, pixels),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask_patch_size=16 must be a multiple of the backbone's feature_stride 32"):
        SimMIM(backbone="convnext_atto", backbone_kwargs={"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)},
               mask_patch_size=16)
