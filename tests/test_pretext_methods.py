"""Pretext-task methods: training steps, features, what the backbone sees, random draws and resume."""

from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import Colorization, Inpainting, Jigsaw, Rotation
from ssl_lightning.methods.pretext import top1_accuracy
from ssl_lightning.nn.batchnorm import running_stats_frozen
from ssl_lightning.transforms import SimCLRViews
from ssl_lightning.transforms.pretext import lab_to_rgb, rotate_batch

BACKBONE: dict[str, Any] = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 4}}
METHODS = [
    (Rotation, {}),
    (Jigsaw, {"head_hidden_dim": 32, "num_permutations": 10}),
    (Colorization, {}),
    (Colorization, {"mode": "classification", "regression_loss": "mse"}),
    (Inpainting, {}),
    (Inpainting, {"mask": "random_boxes", "hole_fraction": 0.25}),
]


def _batch(b: int = 6, size: int = 32) -> dict[str, Any]:
    return {"views": [torch.randn(b, 3, size, size)], "label": torch.arange(b)}


def _step(model: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    logged: dict[str, float] = {}
    def log(name: str, value: torch.Tensor, **kwargs: Any) -> None:
        logged[name] = float(value.detach())

    model.log = log  # type: ignore[method-assign]
    return model.training_step(batch, 0), logged


@pytest.mark.parametrize("cls, kwargs", METHODS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_training_step_gives_loss_metric_and_whole_image_features(cls: type, kwargs: dict) -> None:
    model = cls(**BACKBONE, **kwargs)
    batch = _batch()
    out, logged = _step(model, batch)
    assert out["loss"].isfinite() and out["loss"].requires_grad
    out["loss"].backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert out["features"].shape == (6, model.backbone.feature_dim) and not out["features"].requires_grad
    assert "train/loss" in logged and len(logged) == 2, logged
    model.eval()
    assert model(batch["views"][0]).shape == (6, model.backbone.feature_dim)


def test_rotation_features_are_those_of_the_unrotated_view() -> None:
    model = Rotation(**BACKBONE)
    batch = _batch()
    out, _ = _step(model, batch)
    torch.testing.assert_close(out["features"], model(rotate_batch(batch["views"][0])[0])[:6])


def test_top1_accuracy_matches_a_loop() -> None:
    logits, labels = torch.randn(50, 4), torch.randint(0, 4, (50,))
    expected = sum(int(max(range(4), key=lambda k: logits[i, k].item()) == labels[i]) for i in range(50)) / 50
    assert top1_accuracy(logits, labels).item() == pytest.approx(expected)


def test_two_views_are_refused_with_the_key_to_set() -> None:
    batch = {"views": [torch.randn(2, 3, 32, 32)] * 2, "label": torch.arange(2)}
    with pytest.raises(ValueError, match="views.num_views: 1"):
        Rotation(**BACKBONE).training_step(batch, 0)


def test_pixel_methods_need_a_spatial_backbone() -> None:
    with pytest.raises(ValueError, match="vit_tiny.*feature_map"):
        Inpainting(backbone="vit_tiny", backbone_kwargs={"image_size": 32, "patch_size": 8, "depth": 1})


def test_feature_map_pools_to_the_backbone_features() -> None:
    for name, size, stride in [("cifar_resnet18", 32, 8), ("resnet18", 64, 32)]:
        backbone = build_backbone(name, base_width=4).eval()
        x = torch.randn(2, 3, size, size)
        feature_map = backbone.feature_map(x)
        assert backbone.feature_stride == stride and feature_map.shape == (2, 32, size // stride, size // stride)
        torch.testing.assert_close(feature_map.mean(dim=(-2, -1)), backbone(x))


def test_colorization_backbone_sees_lightness_only() -> None:
    model = Colorization(**BACKBONE).eval()
    lightness = torch.rand(2, 1, 8, 8) * 40 + 30
    chroma = torch.rand(2, 2, 8, 8) * 30 - 15
    colourful = lab_to_rgb(torch.cat([lightness, chroma], dim=1))
    grey = lab_to_rgb(torch.cat([lightness, torch.zeros_like(chroma)], dim=1))
    assert (colourful - grey).abs().max() > 0.05

    def normalize(rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - model.pixel_mean) / model.pixel_std

    torch.testing.assert_close(model(normalize(colourful)), model(normalize(grey)), atol=1e-4, rtol=1e-4)


def test_colorization_takes_mean_and_std_from_the_datamodule(tmp_path) -> None:
    model = Colorization(**BACKBONE)
    data = SyntheticData(num_samples=8, batch_size=4, image_size=16, num_workers=0, views=SimCLRViews(16, num_views=1))
    data.mean, data.std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert model.pixel_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert model.pixel_std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])


def test_tile_pass_leaves_batchnorm_running_statistics_alone() -> None:
    bn = nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    with running_stats_frozen(bn):
        y = bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)  # batch statistics used
    assert bn.momentum == 0.1
    bn(x)
    assert not torch.equal(bn.running_mean, torch.zeros(3))


def test_jigsaw_running_statistics_come_from_whole_images() -> None:
    model = Jigsaw(**BACKBONE, head_hidden_dim=32, num_permutations=10)
    batch = _batch()
    reference = build_backbone("cifar_resnet18", base_width=4)
    reference.load_state_dict(model.backbone.state_dict())
    _step(model, batch)
    with torch.no_grad():
        reference(batch["views"][0])  # one whole-image pass in training mode
    torch.testing.assert_close(model.backbone.bn1.running_mean, reference.bn1.running_mean)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_task_draws_differ_per_batch_and_rank_and_resume_from_the_checkpoint() -> None:
    model = Inpainting(**BACKBONE, mask="random_boxes", hole_fraction=0.25)
    view = torch.zeros(8, 3, 32, 32)
    first, second = model.hole(view), model.hole(view)
    assert not torch.equal(first, second)
    checkpoint: dict[str, Any] = {}
    model.on_save_checkpoint(checkpoint)
    third = model.hole(view)
    resumed = Inpainting(**BACKBONE, mask="random_boxes", hole_fraction=0.25)
    resumed.on_load_checkpoint(checkpoint)
    assert torch.equal(resumed.hole(view), third)
    fresh = Inpainting(**BACKBONE, mask="random_boxes", hole_fraction=0.25)
    assert torch.equal(fresh.hole(view), first)
    other_rank = Inpainting(**BACKBONE, mask="random_boxes", hole_fraction=0.25)
    other_rank._trainer = type("FakeTrainer", (), {"global_rank": 1})()
    assert not torch.equal(other_rank.hole(view), first)
