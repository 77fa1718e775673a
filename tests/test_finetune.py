"""Fine-tuning (whole network, head from a probe, layer-wise lr decay) and pseudo-label refinement."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.datamodules.base import SSLDataModule, TensorImages
from ssl_lightning.eval.finetune import FineTuneClassifier, FineTuneConfig, finetune, predict_probabilities
from ssl_lightning.eval.pseudo_label import pseudo_label_refinement, refinement_set, select_confident
from tests.ddp_utils import run_distributed

TRAINER = dict(accelerator="cpu", devices=1, enable_progress_bar=False)
COLOURS = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]], dtype=torch.float32)


def colour_images(num: int, seed: int) -> TensorImages:
    """Class c is a 16x16 image of colour c plus noise: separable by the mean colour."""
    labels = torch.arange(num) % len(COLOURS)
    noise = torch.randn(num, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 25
    return TensorImages((COLOURS[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8), labels)


class ColourData(SSLDataModule):
    num_classes = 4
    default_image_size = 16

    def __init__(self, num_train: int = 64) -> None:
        self.num_train = num_train
        super().__init__(batch_size=16, num_workers=0, eval_batch_size=32, seed=0)

    def train_source(self) -> TensorImages:
        return colour_images(self.num_train, seed=0)

    def val_source(self) -> TensorImages:
        return colour_images(32, seed=1)


def tiny_resnet() -> nn.Module:
    return build_backbone("cifar_resnet18", base_width=4)


def test_finetune_trains_a_copy_of_the_whole_network_above_chance() -> None:
    backbone = tiny_resnet()
    original = copy.deepcopy(backbone.state_dict())
    config = FineTuneConfig(epochs=3, batch_size=16, lr=1.0, crop_scale=(0.5, 1.0))
    result = finetune(backbone, ColourData(), config=config, trainer_kwargs=TRAINER)
    assert result.num_train == 64
    assert result.top1 > 50.0  # chance is 25%
    assert result.top5 == 100.0  # 4 classes: top-5 is top-4
    for name, value in backbone.state_dict().items():  # the caller's backbone keeps its pretrained weights
        torch.testing.assert_close(value, original[name], rtol=0, atol=0)
    tuned = result.model.backbone.state_dict()
    assert not torch.equal(tuned["conv1.weight"], original["conv1.weight"])  # the first layer was trained too
    assert not torch.equal(tuned["layer4.1.conv2.weight"], original["layer4.1.conv2.weight"])
    subset = finetune(backbone, ColourData(), indices=torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]),
                      config=FineTuneConfig(epochs=1, batch_size=16), trainer_kwargs=TRAINER)
    assert subset.num_train == 8


def test_head_starts_at_zero_or_as_the_given_linear_layer() -> None:
    backbone = tiny_resnet()
    assert FineTuneClassifier(backbone, 4).head.weight.abs().sum() == 0
    probe = nn.Linear(backbone.feature_dim, 4)
    model = FineTuneClassifier(backbone, 4, head_init=probe)
    torch.testing.assert_close(model.head.weight, probe.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.head.bias, probe.bias, rtol=0, atol=0)
    assert model.head.weight.data_ptr() != probe.weight.data_ptr()  # a copy: training leaves the probe alone
    with pytest.raises(ValueError, match=r"head_init .*\(4, 32\)"):
        FineTuneClassifier(backbone, 4, head_init=nn.Linear(backbone.feature_dim, 10))


@pytest.mark.parametrize("name, kwargs, stem", [
    ("vit_tiny", dict(image_size=16, patch_size=8, depth=3), "model.patch_embed.proj.weight"),
    ("mae_vit_tiny", dict(image_size=16, patch_size=8, depth=3), "patch_embed.weight"),
])
def test_layer_decay_gives_earlier_blocks_smaller_learning_rates(name: str, kwargs: dict, stem: str) -> None:
    backbone = build_backbone(name, **kwargs)
    config = FineTuneConfig(optimizer="adamw", lr=0.1, weight_decay=0.05, layer_decay=0.5)
    model = FineTuneClassifier(backbone, 4, config)
    optimizer = model.make_optimizer(global_batch_size=256)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert sorted(lr_of) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    params = dict(model.backbone.named_parameters())
    prefix = "model." if name == "vit_tiny" else ""
    depth = 3
    assert lr_of[id(params[stem])] == pytest.approx(0.1 * 0.5 ** (depth + 1))
    assert lr_of[id(params[prefix + "cls_token"])] == pytest.approx(0.1 * 0.5 ** (depth + 1))
    for i in range(depth):
        assert lr_of[id(params[f"{prefix}blocks.{i}.attn.qkv.weight"])] == pytest.approx(0.1 * 0.5 ** (depth - i))
        assert lr_of[id(params[f"{prefix}blocks.{i}.norm1.bias"])] == pytest.approx(0.1 * 0.5 ** (depth - i))
    for top in (params[prefix + "norm.weight"], model.head.weight, model.head.bias):
        assert lr_of[id(top)] == pytest.approx(0.1)
    assert wd_of[id(params[f"{prefix}blocks.0.attn.qkv.weight"])] == 0.05 and wd_of[id(model.head.weight)] == 0.05
    assert wd_of[id(params[prefix + "cls_token"])] == 0.0 and wd_of[id(params[f"{prefix}blocks.0.norm1.weight"])] == 0.0
    if name == "vit_tiny":  # through a real fit, the schedule scales every group alike: the ratios remain
        result = finetune(backbone, ColourData(num_train=16), config=FineTuneConfig(
            epochs=1, batch_size=16, optimizer="adamw", lr=1e-3, warmup_epochs=1, layer_decay=0.5), trainer_kwargs=TRAINER)
        groups = result.trainer.optimizers[0].param_groups
        ratios = {g["layer"]: g["lr"] / g["initial_lr"] for g in groups}
        assert len(set(round(r, 9) for r in ratios.values())) == 1
        assert {g["layer"]: g["initial_lr"] for g in groups}[0] == pytest.approx(1e-3 * 16 / 256 * 0.5 ** 4)


def test_layer_decay_needs_a_vit() -> None:
    with pytest.raises(ValueError, match="layer_decay needs a ViT backbone .*ResNetTrunk"):
        FineTuneClassifier(tiny_resnet(), 4, FineTuneConfig(layer_decay=0.7))
    with pytest.raises(ValueError, match="layer_decay must lie in"):
        FineTuneConfig(layer_decay=1.5)


def test_select_confident_keeps_rows_at_or_above_the_threshold() -> None:
    probabilities = torch.tensor([[0.95, 0.05, 0.0], [0.6, 0.4, 0.0], [0.05, 0.05, 0.9], [0.3, 0.7, 0.0], [0.0, 0.1, 0.9]])
    keep, labels = select_confident(probabilities, threshold=0.9)
    assert keep.tolist() == [0, 2, 4] and labels.tolist() == [0, 2, 2]  # 0.9 itself is kept
    keep, labels = select_confident(probabilities, threshold=0.65)
    assert keep.tolist() == [0, 2, 3, 4] and labels.tolist() == [0, 2, 1, 2]
    assert select_confident(probabilities, threshold=1.0)[0].numel() == 0
    with pytest.raises(ValueError, match="shape"):
        select_confident(probabilities[0], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        select_confident(probabilities, 1.5)


def test_refinement_set_is_labeled_images_then_kept_images_with_pseudo_labels() -> None:
    images = torch.arange(6, dtype=torch.uint8)[:, None, None, None].expand(6, 3, 2, 2).contiguous()
    source = TensorImages(images, torch.arange(6))
    data = refinement_set(source, labeled=torch.tensor([1, 4]), kept=torch.tensor([0, 5]), pseudo_labels=torch.tensor([3, 2]))
    items = [(int(image[0, 0, 0]), label) for image, label in (data[i] for i in range(len(data)))]
    assert items == [(1, 1), (4, 4), (0, 3), (5, 2)]


def test_pseudo_label_refinement_retrains_on_labeled_and_confident_images() -> None:
    data = ColourData()
    labeled = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # two images per class
    config = FineTuneConfig(epochs=5, batch_size=16, lr=1.0, crop_scale=(0.5, 1.0))
    result = pseudo_label_refinement(tiny_resnet(), data, labeled, threshold=0.3, config=config, trainer_kwargs=TRAINER)
    assert (result.num_labeled, result.num_unlabeled) == (8, 56)
    # the same selection, recomputed from the first model's predictions on the other training images
    train_eval = torch.utils.data.Subset(data.train_eval_dataset(), range(8, 64))
    probabilities, labels = predict_probabilities(result.before.model, train_eval, batch_size=32)
    assert labels.tolist() == (torch.arange(8, 64) % 4).tolist()
    kept = probabilities.max(dim=1).values >= 0.3
    assert result.num_kept == int(kept.sum()) > 0
    expected_accuracy = (probabilities.argmax(dim=1) == labels)[kept].float().mean().item() * 100
    assert result.kept_accuracy == pytest.approx(expected_accuracy)
    assert result.before.num_train == 8 and result.after.num_train == 8 + result.num_kept
    assert 0.0 <= result.before.top1 <= 100.0 and 0.0 <= result.after.top1 <= 100.0
    # nothing reaches the threshold: no retraining, the first model is the result
    none_kept = pseudo_label_refinement(tiny_resnet(), data, labeled, threshold=1.0,
                                        config=FineTuneConfig(epochs=1, batch_size=16), trainer_kwargs=TRAINER)
    assert none_kept.num_kept == 0 and none_kept.kept_accuracy is None and none_kept.after is none_kept.before


def _predict_on_ranks(rank: int, world_size: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = FineTuneClassifier(tiny_resnet(), 4, head_init=nn.Linear(32, 4))
    dataset = [{"image": image, "label": i} for i, image in enumerate(images)]
    return predict_probabilities(model, dataset, batch_size=2)


def test_predict_probabilities_under_ddp_scores_every_item_once_in_order() -> None:
    images = torch.randn(7, 3, 16, 16)
    expected, expected_labels = _predict_on_ranks(0, 1, images)
    probabilities, labels = run_distributed(_predict_on_ranks, 2, images)
    assert labels.tolist() == list(range(7)) == expected_labels.tolist()
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(7))


def test_eval_command_finetune_and_pseudo_label_protocols(tmp_path, monkeypatch) -> None:
    """``ssl-lightning eval --protocols [finetune, pseudo_label]`` on a 2-step SimCLR checkpoint: one row per
    label fraction (and all labels), the head taken from the probe of the same labels."""
    import json
    from pathlib import Path

    from ssl_lightning.cli import main as cli_main
    from ssl_lightning.cli import run_cli

    configs = Path(__file__).resolve().parents[1] / "configs"
    monkeypatch.chdir(tmp_path)
    data = ["--data=SyntheticData", "--data.init_args.num_samples=48", "--data.init_args.num_val_samples=16",
            "--data.init_args.image_size=16", "--data.init_args.num_classes=4", "--data.init_args.batch_size=16",
            "--data.init_args.num_workers=0", "--data.init_args.views.size=16"]
    fit = run_cli(["fit", f"--config={configs / 'simclr_bundled.yaml'}", "--trainer.max_steps=2",
                   "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.logger=false",
                   "--trainer.callbacks=[{class_path: ModelCheckpoint, init_args: {save_last: true, save_top_k: 0}}]",
                   "--model.init_args.backbone=cifar_resnet18", "--model.init_args.backbone_kwargs={base_width: 4}", *data])
    cli_main(["eval", f"--config={configs / 'eval' / 'bundled.yaml'}", f"--checkpoint={fit.trainer.checkpoint_callback.last_model_path}",
              *data, "--output_dir=out", "--cache_dir=cache", "--device=cpu", "--protocols=[finetune, pseudo_label]",
              "--label_fractions=[0.25]", "--linear.lrs=[0.1]", "--linear.weight_decays=[0.0]", "--linear.epochs=2",
              "--finetune.epochs=1", "--finetune.batch_size=8", "--finetune.head_from_probe=true",
              "--finetune.all_labels=true", "--pseudo_label.threshold=0.2"])
    results = json.loads((tmp_path / "out" / "metrics.json").read_text())["results"]
    assert list(results) == ["25%/finetune", "finetune", "25%/pseudo_label/before", "25%/pseudo_label/after"]
    assert results["25%/finetune"]["num_train"] == 12 and results["finetune"]["num_train"] == 48
    assert results["25%/finetune"]["head_from_probe"] is True
    after = results["25%/pseudo_label/after"]
    assert (after["num_labeled"], after["num_unlabeled"], after["threshold"]) == (12, 36, 0.2)
    assert 0 <= after["num_kept"] <= 36 and all(0 <= r["top1"] <= r["top5"] <= 100 for r in results.values())
    assert "| 25%/pseudo_label/after |" in (tmp_path / "out" / "report.md").read_text()


def test_finetune_eval_config_parses_as_an_overlay() -> None:
    from pathlib import Path

    from ssl_lightning.eval.command import build_parser

    configs = Path(__file__).resolve().parents[1] / "configs" / "eval"
    parser = build_parser()
    options = parser.parse_args([f"--config={configs / 'bundled.yaml'}", f"--config={configs / 'finetune.yaml'}",
                                 "--checkpoint=x.ckpt", "--finetune.layer_decay=0.75"])
    assert options.protocols == ["linear", "fractions", "finetune", "pseudo_label"]
    assert options.data.class_path.endswith("BundledCIFAR10")
    finetune_options = parser.instantiate_classes(options).finetune
    assert isinstance(finetune_options, FineTuneConfig)
    assert (finetune_options.epochs, finetune_options.lr, finetune_options.layer_decay) == (30, 0.05, 0.75)
    assert finetune_options.crop_scale == (0.08, 1.0) and options.pseudo_label.threshold == 0.9
