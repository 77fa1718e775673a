"""MAE (He et al. 2022): patches, masking, position embeddings and the loss against slow references."""

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.losses.mae import mae_loss
from ssl_lightning.methods import MAE
from ssl_lightning.nn.pos_embed import sincos_pos_embed_2d
from ssl_lightning.nn.vit_mae import MAEDecoder, MaskedViTEncoder, num_visible, patchify, random_masking, unpatchify
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews

ENCODER = {"image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_mae(**kwargs) -> MAE:
    args = dict(backbone="mae_vit_tiny", backbone_kwargs=ENCODER, decoder_dim=16, decoder_depth=1, decoder_num_heads=2,
                optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=1))
    return MAE(**{**args, **kwargs})


def slow_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """Patch n = (row i, column j) row-major; inside a patch pixels as (p, q, channel)."""
    b, c, h, w = images.shape
    out = torch.empty(b, (h // p) * (w // p), p * p * c)
    for s in range(b):
        for i in range(h // p):
            for j in range(w // p):
                values = [images[s, ch, i * p + u, j * p + v] for u in range(p) for v in range(p) for ch in range(c)]
                out[s, i * (w // p) + j] = torch.stack(values)
    return out


def slow_mae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """The paper's loss, one masked patch at a time: MSE per patch, averaged over the masked patches."""
    target = slow_patchify(images, p)
    total, count = 0.0, 0
    for s in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if mask[s, n] == 0:
                continue
            t = target[s, n].double()
            if norm_pix:
                mean = t.sum() / t.numel()
                var = ((t - mean) ** 2).sum() / (t.numel() - 1)
                t = (t - mean) / math.sqrt(var + 1e-6)
            total += float(((pred[s, n].double() - t) ** 2).sum() / t.numel())
            count += 1
    return torch.tensor(total / count, dtype=torch.float64)


def test_patchify_matches_the_slow_layout_and_unpatchify_inverts_it() -> None:
    images = torch.randn(2, 3, 12, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 9, 48)
    assert torch.equal(patches, slow_patchify(images, 4))
    assert torch.equal(unpatchify(patches, 4), images)


def test_patchify_rejects_indivisible_sizes() -> None:
    with pytest.raises(ValueError, match="10x10 is not divisible by the patch size 4"):
        patchify(torch.zeros(1, 3, 10, 10), 4)


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
def test_every_sample_keeps_exactly_the_configured_number_of_patches(mask_ratio: float) -> None:
    tokens = torch.randn(64, 49, 8)
    visible, mask, ids_restore = random_masking(tokens, mask_ratio, torch.Generator().manual_seed(0))
    keep = int(49 * (1 - mask_ratio))
    assert visible.shape == (64, keep, 8)
    assert torch.equal(mask.sum(dim=1), torch.full((64,), 49.0 - keep))
    for s in range(64):  # the visible tokens are exactly the tokens where mask == 0
        kept = sorted(tuple(t.tolist()) for t in visible[s])
        expected = sorted(tuple(tokens[s, n].tolist()) for n in range(49) if mask[s, n] == 0)
        assert kept == expected
    assert len({tuple(m.tolist()) for m in mask}) > 60, "masks should differ between samples"
    shuffled = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(49).expand(64, -1))


def test_changing_a_visible_prediction_leaves_the_loss_unchanged() -> None:
    images = torch.randn(3, 3, 16, 16)
    mask = (torch.rand(3, 16) < 0.75).float()
    mask[:, 0], mask[:, 1] = 0.0, 1.0
    pred = torch.randn(3, 16, 48)
    for norm_pix in (False, True):
        loss = mae_loss(pred, patchify(images, 4), mask, norm_pix)
        changed = pred.clone()
        changed[:, 0] += 100.0  # a visible patch
        assert torch.equal(mae_loss(changed, patchify(images, 4), mask, norm_pix), loss)
        changed[:, 1] += 1.0  # a masked patch
        assert not torch.allclose(mae_loss(changed, patchify(images, 4), mask, norm_pix), loss)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_the_slow_reference(norm_pix: bool) -> None:
    model = tiny_mae(norm_pix_loss=norm_pix)
    images = torch.randn(3, 3, 16, 16)
    loss, pred, mask, _ = model.masked_loss(images, torch.Generator().manual_seed(1))
    assert mask.sum() == 3 * (16 - num_visible(16, 0.75))
    expected = slow_mae_loss(pred.detach(), images, mask, 4, norm_pix)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)


def test_encoder_sees_only_the_visible_patches_plus_the_class_token() -> None:
    encoder = MaskedViTEncoder(**ENCODER)
    lengths = []
    encoder.blocks[0].register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    latent, mask, _ = encoder.forward_masked(torch.randn(2, 3, 16, 16), 0.75, torch.Generator().manual_seed(0))
    assert lengths == [num_visible(16, 0.75) + 1] and latent.shape == (2, 5, 32)
    features = encoder(torch.randn(2, 3, 16, 16))  # evaluation: the full image, no masking
    assert lengths[-1] == 16 + 1 and features.shape == (2, encoder.feature_dim)


def test_full_image_features_are_deterministic_and_the_class_token_or_mean() -> None:
    images = torch.randn(2, 3, 16, 16)
    cls = MaskedViTEncoder(**ENCODER)
    assert torch.equal(cls(images), cls(images))
    latent = cls.encode(cls.embed_patches(images))
    assert torch.equal(cls(images), latent[:, 0])
    mean = MaskedViTEncoder(**ENCODER, global_pool="mean")
    mean.load_state_dict(cls.state_dict())
    assert torch.allclose(mean(images), latent[:, 1:].mean(dim=1))


def test_decoder_puts_every_visible_token_back_at_its_patch() -> None:
    torch.manual_seed(0)
    decoder = MAEDecoder(grid_size=4, encoder_dim=8, patch_dim=48, dim=8, depth=1, num_heads=2)
    with torch.no_grad():  # make the embedding the identity, the mask token and positions zero
        decoder.embed.weight.copy_(torch.eye(8))
        decoder.embed.bias.zero_()
        decoder.mask_token.zero_()
        decoder.pos_embed.zero_()
    tokens = torch.arange(16, dtype=torch.float32).view(1, 16, 1).expand(2, 16, 8) + 1  # patch n holds n + 1
    visible, mask, ids_restore = random_masking(tokens, 0.75, torch.Generator().manual_seed(3))
    latent = torch.cat([torch.zeros(2, 1, 8), visible], dim=1)
    seen = []
    decoder.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    decoder(latent, ids_restore)
    restored = seen[0][:, 1:, 0]
    expected = torch.where(mask.bool(), torch.zeros(2, 16), tokens[:, :, 0])
    assert torch.equal(restored, expected)


def test_sincos_position_embedding_matches_the_formula() -> None:
    dim, grid = 16, 3
    embed = sincos_pos_embed_2d(dim, grid, cls_token=True)
    assert embed.shape == (1 + grid * grid, dim) and torch.equal(embed[0], torch.zeros(dim))
    quarter = dim // 4
    for i in range(grid):
        for j in range(grid):
            row = embed[1 + i * grid + j]
            for k in range(quarter):
                w = 1 / 10000 ** (k / quarter)
                expected = [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)]
                got = [row[k], row[quarter + k], row[2 * quarter + k], row[3 * quarter + k]]
                for e, g in zip(expected, got):
                    assert abs(float(g) - e) < 1e-6
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, 3)


def test_position_embeddings_are_fixed_buffers() -> None:
    model = tiny_mae()
    names = {name for name, _ in model.named_parameters()}
    assert not any("pos_embed" in name for name in names)
    assert "backbone.pos_embed" in model.state_dict() and "decoder.pos_embed" in model.state_dict()


def test_mae_rejects_a_backbone_that_cannot_mask() -> None:
    with pytest.raises(ValueError, match="MAE needs a masked ViT backbone"):
        MAE(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4})


def test_a_few_steps_log_the_loss_and_write_the_reconstruction_grid(tmp_path: Path) -> None:
    views = SimCLRViews(size=16, num_views=1, scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    data = SyntheticData(num_samples=16, num_val_samples=8, image_size=16, batch_size=8, num_workers=0, views=views)
    trainer = Trainer(accelerator="cpu", max_steps=3, logger=CSVLogger(tmp_path), limit_val_batches=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = tiny_mae()
    trainer.fit(model, data)
    assert trainer.logged_metrics["train/loss"].isfinite() and trainer.logged_metrics["val/loss"].isfinite()
    assert any(type(c).__name__ == "MAEReconstructionLogger" for c in trainer.callbacks)
    png = Path(trainer.log_dir) / "mae_reconstruction.png"
    assert png.is_file()
    from torchvision.io import read_image

    grid = read_image(str(png))
    assert grid.shape[1:] == (2 + 8 * 18, 2 + 4 * 18)  # 8 rows x 4 columns of 16 px with 2 px padding


def _fit_tiny(root: Path, max_steps: int, ckpt_path: str | None = None) -> MAE:
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0, verbose=False)
    views = SimCLRViews(size=16, num_views=1, scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    data = SyntheticData(num_samples=16, image_size=16, batch_size=8, num_workers=0, views=views, seed=0)
    every_2_steps = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, logger=False, limit_val_batches=0, deterministic=True,
                      callbacks=[every_2_steps], enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    model = tiny_mae()
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def test_resumed_run_draws_the_same_masks_and_ends_identical(tmp_path: Path) -> None:
    full = _fit_tiny(tmp_path / "full", 6)
    resumed = _fit_tiny(tmp_path / "resumed", 6, ckpt_path=str(tmp_path / "full" / "step=2.ckpt"))
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
