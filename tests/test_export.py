"""Export round trips: the plain torchvision/timm model loaded (strict) from the export gives our backbone's features."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.cli import main
from ssl_lightning.eval.export import (
    CARD_FILE,
    WEIGHTS_FILE,
    build_exported_model,
    export_backbone,
    export_target,
    load_exported_model,
    read_card,
)
from ssl_lightning.eval.plots import umap_available
from ssl_lightning.methods import SSLMethod

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def randomized(method: SSLMethod) -> SSLMethod:
    """Non-trivial norm statistics and affine parameters, so eval-mode features depend on every buffer."""
    generator = torch.Generator().manual_seed(1)
    for module in method.backbone.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.normal_(module.weight, 1.0, 0.2, generator=generator)
            nn.init.normal_(module.bias, 0.0, 0.2, generator=generator)
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return method


def round_trip(method: SSLMethod, out: Path, images: torch.Tensor) -> nn.Module:
    """Export, load the weights into the plain model with strict=True, compare features; returns that model."""
    export_backbone(method, out, metrics={"knn_top1": 51.25, "linear": {"top1": 60.5}}, epoch=3, global_step=40)
    state = torch.load(out / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert type(state) is dict and all(type(v) is torch.Tensor for v in state.values())
    model = build_exported_model(out)
    assert model.load_state_dict(state, strict=True).missing_keys == []
    with torch.no_grad():
        expected = method.backbone.eval()(images)
        actual = model.eval()(images)
    assert actual.shape == (images.shape[0], method.backbone.feature_dim)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    return model


@pytest.mark.parametrize("backbone", ["cifar_resnet18", "resnet18"])
def test_resnet_round_trip_into_torchvision(backbone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    method = randomized(SSLMethod(backbone=backbone))
    size = 32 if backbone.startswith("cifar_") else 64
    images = torch.randn(2, 3, size, size)
    model = round_trip(method, tmp_path, images)
    assert type(model) is torchvision.models.ResNet and isinstance(model.fc, nn.Identity)
    cifar = backbone.startswith("cifar_")
    assert (model.conv1.kernel_size, model.conv1.stride) == (((3, 3), (1, 1)) if cifar else ((7, 7), (2, 2)))
    assert isinstance(model.maxpool, nn.Identity) == cifar

    card_text = (tmp_path / CARD_FILE).read_text()
    card = read_card(tmp_path)
    assert (card["backbone"], card["library"], card["model"], card["cifar_stem"]) == (backbone, "torchvision", "resnet18", cifar)
    assert card["metrics"] == {"knn_top1": 51.25, "linear": {"top1": 60.5}} and "| linear/top1 | 60.5 |" in card_text
    assert "ssl_lightning.methods.base.SSLMethod" in card_text and "optimizer steps: 40" in card_text

    # the card's own loading snippet (torchvision only, no ssl_lightning) gives the same features
    snippet = re.search(r"```python\n(.*?)```", card_text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet, namespace)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](images), method.backbone(images), rtol=0, atol=1e-5)


def test_bottleneck_resnet_maps_key_for_key() -> None:
    ours, theirs = build_backbone("resnet50").state_dict(), build_exported_model("resnet50").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_timm_vit_round_trip(tmp_path: Path) -> None:
    method = randomized(SSLMethod(backbone="vit_tiny", backbone_kwargs={"image_size": 32, "patch_size": 8, "depth": 2}))
    model = round_trip(method, tmp_path, torch.randn(2, 3, 32, 32))
    assert isinstance(model, timm.models.VisionTransformer)
    assert read_card(tmp_path)["model_kwargs"]["img_size"] == 32
    if getattr(method.backbone.model, "dynamic_img_size", False):  # other image sizes behave the same too
        smaller = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(model(smaller), method.backbone(smaller), rtol=0, atol=1e-5)


def test_timm_convnext_round_trip(tmp_path: Path) -> None:
    kwargs = {"dims": (8, 16, 32, 64), "depths": (1, 1, 2, 1), "ls_init_value": 0.5}  # LayerScale large enough to matter
    method = randomized(SSLMethod(backbone="convnext_atto", backbone_kwargs=kwargs))
    images = torch.randn(2, 3, 64, 64)
    model = round_trip(method, tmp_path, images)
    assert isinstance(model, timm.models.ConvNeXt) and method.backbone.feature_stride == 32
    assert method.backbone.feature_map(images).shape == (2, 64, 2, 2)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_mae_encoder_round_trip_into_timm_vit(pool: str, tmp_path: Path) -> None:
    kwargs = {"image_size": 32, "patch_size": 8, "depth": 2, "global_pool": pool}
    method = randomized(SSLMethod(backbone="mae_vit_tiny", backbone_kwargs=kwargs))
    model = round_trip(method, tmp_path, torch.randn(2, 3, 32, 32))
    assert isinstance(model, timm.models.VisionTransformer) and model.global_pool == ("token" if pool == "cls" else "avg")
    state = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    assert "patch_embed.proj.weight" in state and "pos_embed" in state  # renamed conv; fixed positions as a tensor


def test_backbones_without_plain_equivalent_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"base_width=8 cannot be exported.*64 channels"):
        export_backbone(SSLMethod(backbone="cifar_resnet18", backbone_kwargs={"base_width": 8}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"'resnet19' has no torchvision/timm equivalent.*exportable: .*mae_vit_tiny"):
        export_target("resnet19")
    with pytest.raises(ValueError, match="Linear has no image backbone"):
        export_backbone(nn.Linear(2, 2), tmp_path / "out")


def test_fit_eval_with_plots_then_export_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The user's path: fit a checkpoint, `ssl-lightning eval --plots true`, export with its metrics.json."""
    monkeypatch.chdir(tmp_path)
    data = ["--data=SyntheticData", "--data.init_args.num_samples=16", "--data.init_args.num_val_samples=24",
            "--data.init_args.num_classes=3", "--data.init_args.batch_size=8", "--data.init_args.image_size=16",
            "--data.init_args.num_workers=0", "--data.init_args.views.size=16"]
    main(["fit", f"--config={CONFIGS / 'simclr_bundled.yaml'}", "--model.init_args.backbone_kwargs={}",
          "--model.init_args.projection_hidden_dim=16", "--model.init_args.projection_dim=8", *data,
          "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.devices=1"])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    main(["eval", f"--checkpoint={checkpoint}", *data, "--output_dir=eval", "--cache_dir=cache", "--device=cpu",
          "--protocols=[knn, linear]", "--knn.k=[5]", "--linear.lrs=[0.1]", "--linear.weight_decays=[0.0]",
          "--linear.epochs=2", "--plots=true"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = ["tsne.png", *(["umap.png"] if umap_available() else []), "confusion.png"]
    assert [Path(path).name for path in metrics["plots"]] == expected
    for name in ("tsne.png", "confusion.png"):
        assert (tmp_path / "eval" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    main(["export", f"--checkpoint={checkpoint}", "--output_dir=export", "--metrics=eval/metrics.json"])
    assert "exported" in capsys.readouterr().out
    card = read_card(tmp_path / "export")
    assert card["method"] == "ssl_lightning.methods.simclr.SimCLR" and card["global_step"] == 1
    assert card["metrics"] == metrics and "SyntheticData" in card["data"]
    linear = metrics["results"]["linear"]
    assert f"| linear | {linear['top1']:.4g} | {linear['top5']:.4g} |" in (tmp_path / "export" / CARD_FILE).read_text()
    from ssl_lightning.eval.checkpoint import load_method

    method, model = load_method(checkpoint), load_exported_model(tmp_path / "export")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), method(images), rtol=0, atol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(["export", f"--checkpoint={checkpoint}", "--output_dir=export", "--metrics=missing.json"])
    assert stopped.value.code == 1
    assert "ssl-lightning export: error: --metrics missing.json: not a readable JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint=missing.ckpt", "--output_dir=export"])
    assert "checkpoint not found" in capsys.readouterr().err
