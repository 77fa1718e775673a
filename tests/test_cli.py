"""Every config runs ``fit`` through the CLI for a couple of steps; bad input gives clear errors."""

import json
from pathlib import Path

import pytest
import wandb
import yaml

from ssl_lightning.cli import run_cli
from ssl_lightning.datamodules.base import TensorImages
from ssl_lightning.datamodules.bundled import BundledCIFAR10
from tests.test_datamodules import make_image_folder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHOD_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "base.yaml")
TINY = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.sync_batchnorm=false",
]

#: what a ViT method's CIFAR-10 / ImageNet recipe also shrinks to run on 32 px images with 8 px patches and a
#: 32-d ViT: its heads, predictor and mask patches (AIM's ImageNet head alone has 400M parameters)
DINO_HEADS = ["--model.init_args.out_dim=64", "--model.init_args.hidden_dim=32", "--model.init_args.bottleneck_dim=16"]
VIT_METHOD_ARGS = {
    "dino": DINO_HEADS,
    "ibot": [*DINO_HEADS, "--model.init_args.patch_out_dim=64"],
    "dinov2": [*DINO_HEADS, "--model.init_args.patch_out_dim=64"],
    "ijepa": ["--model.init_args.predictor_dim=16", "--model.init_args.predictor_depth=1",
              "--model.init_args.predictor_num_heads=2"],
    "msn": ["--model.init_args.projection_hidden_dim=32", "--model.init_args.projection_dim=16",
            "--model.init_args.num_prototypes=32"],
    "aim": ["--model.init_args.head_dim=32", "--model.init_args.head_blocks=1"],
    "lejepa": ["--model.init_args.projection_hidden_dim=32", "--model.init_args.num_slices=64"],
    "simmim": ["--model.init_args.mask_patch_size=16"],
}
#: the bundled images a config test reads (kNN bank and queries: the monitor's two evaluations of a ViT on all
#: 6,000 bundled images took 20-40 s of each bundled ViT config's test)
BUNDLED_SUBSET = {"train": 256, "test": 64}


@pytest.fixture(autouse=True)
def few_bundled_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """``BundledCIFAR10`` reads the first images of each split only: the configs' wiring, not the data size, is tested."""
    for split, source in (("train", "train_source"), ("test", "val_source")):
        def first_images(self: BundledCIFAR10, split: str = split) -> TensorImages:
            images = self._splits[split]
            return TensorImages(images.images[: BUNDLED_SUBSET[split]], images.labels[: BUNDLED_SUBSET[split]])

        monkeypatch.setattr(BundledCIFAR10, source, first_images)


def tiny_model_args(config: Path) -> list[str]:
    text = config.read_text()
    if "class_path: MAE" in text:
        return ["--model.init_args.backbone_kwargs={image_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
                "--model.init_args.decoder_dim=16", "--model.init_args.decoder_depth=1", "--model.init_args.decoder_num_heads=2"]
    if "class_path: MaskedLanguageModel" in text:
        return ["--model.init_args.dim=16", "--model.init_args.depth=1", "--model.init_args.num_heads=2"]
    if "backbone: vit" in text:
        if config.stem.endswith("_bundled"):
            return []  # already CPU-sized
        # the config's own ViT settings (class token, registers, LayerScale, pooling) on 32 px, patch 8, 2 blocks
        kwargs = yaml.safe_load(text)["model"]["init_args"].get("backbone_kwargs") or {}
        kwargs = {**kwargs, "image_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
        return [f"--model.init_args.backbone_kwargs={json.dumps(kwargs)}", *VIT_METHOD_ARGS.get(config.stem.split("_")[0], [])]
    small = ["--model.init_args.backbone=cifar_resnet18", "--model.init_args.backbone_kwargs={base_width: 4}"]
    if "class_path: BarlowTwins" in text or "class_path: VICReg" in text:  # 8192-d projectors: 134M parameters
        small += ["--model.init_args.projection_hidden_dim=64", "--model.init_args.projection_dim=64"]
    if "class_path: DeepClusterV2" in text:  # at most one cluster per image of the tests' data (8 to 32 images)
        small.append("--model.init_args.num_prototypes=[4, 4, 4]")
    if "class_path: VICRegL" in text:  # gamma of the 16 cells of a 32 px view's 4 x 4 map (ImageNet's: 20 of 49)
        small.append("--model.init_args.location_matches=[8, 2]")
    if "class_path: WMSE" in text:  # whitening sub-batches of the tests' batches (4 or 8 images)
        small += ["--model.init_args.projection_dim=2", "--model.init_args.whitening_size=4"]
    return small


def tiny_data_args(config: Path, tmp_path: Path) -> list[str]:
    text = config.read_text()
    if "class_path: TextData" in text or "class_path: BundledText" in text:
        small = ["--data.init_args.vocab_size=300", "--data.init_args.max_length=16", "--data.init_args.batch_size=4",
                 "--data.init_args.num_workers=0"]
        if "class_path: TextData" in text:
            corpus = tmp_path / "corpus.txt"
            corpus.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                              "fortune, must be in want of a wife.\n" * 40)
            small.append(f"--data.init_args.files={corpus}")
        return small
    if "class_path: ImageFolder" in text:
        root = make_image_folder(tmp_path / "images", per_class=4)
        small = [f"--data.init_args.root={root}", "--data.init_args.views.size=32", "--data.init_args.batch_size=4",
                 "--data.init_args.num_workers=0"]
        if "local_size:" in text:  # multi-crop: local crops shrink with the global ones (24 96-px local crops
            small.append("--data.init_args.views.local_size=16")  # crash bf16 channels-last backward on CPU)
        return small
    if "class_path: BundledCIFAR10" in text:
        return ["--data.init_args.batch_size=8", "--data.init_args.num_workers=0"]
    return ["--data=SyntheticData", "--data.init_args.num_samples=32", "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0"]


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_every_config_fits_a_couple_of_steps(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", f"--config={config}", *TINY, *tiny_model_args(config), *tiny_data_args(config, tmp_path)])
    assert cli.trainer.global_step == 2
    assert cli.trainer.logged_metrics["train/loss"].isfinite()
    if "class_path: MaskedLanguageModel" in config.read_text():  # text: base.yaml's loggers, not its image callbacks
        assert any(type(logger).__name__ == "TensorBoardLogger" for logger in cli.trainer.loggers)
    else:
        assert any(type(c).__name__ == "OnlineLinearProbe" for c in cli.trainer.callbacks)  # base.yaml was applied


def test_base_config_comes_from_beside_the_first_config_that_has_one() -> None:
    from ssl_lightning.cli.lightning_cli import sibling_base_config

    overlay, recipe = CONFIGS / "logging" / "wandb.yaml", CONFIGS / "simclr_bundled.yaml"
    assert sibling_base_config(["fit", "--config", str(overlay), f"--config={recipe}"]) == [str(CONFIGS / "base.yaml")]
    assert sibling_base_config(["fit", f"--config={recipe}", "--config", str(overlay)]) == [str(CONFIGS / "base.yaml")]
    assert sibling_base_config(["fit", "--config", str(overlay)]) == []
    assert sibling_base_config(["fit", f"--config={CONFIGS / 'base.yaml'}", f"--config={recipe}"]) == []  # given itself


def test_unknown_backbone_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        run_cli(["fit", f"--config={CONFIGS / 'simclr_bundled.yaml'}", "--model.init_args.backbone=resnet19", *TINY])


def test_wandb_overlay_writes_an_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = CONFIGS / "simclr_bundled.yaml"
    run_cli(["fit", f"--config={config}", f"--config={CONFIGS / 'logging' / 'wandb.yaml'}", *TINY,
             *tiny_model_args(config), *tiny_data_args(config, tmp_path)])
    wandb.finish()  # flush the run's files (Lightning leaves the run open at the end of fit)
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "no offline W&B run written"
    assert list(runs[0].rglob("media/images/*.png")), "the view grid was not logged to W&B"


def test_validate_test_and_predict_run_from_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "simclr_bundled.yaml"
    small = [*tiny_model_args(config), "--data=SyntheticData", "--data.init_args.num_samples=16",
             "--data.init_args.num_val_samples=12", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
             "--trainer.accelerator=cpu", "--trainer.devices=1"]
    fit = run_cli(["fit", f"--config={config}", "--trainer.max_steps=2", *small])
    checkpoint = fit.trainer.checkpoint_callback.last_model_path
    assert Path(checkpoint).is_file()
    for command in ("validate", "test"):
        run_cli([command, f"--config={config}", f"--ckpt_path={checkpoint}", *small])
    predict = run_cli(["predict", f"--config={config}", f"--ckpt_path={checkpoint}", "--return_predictions=true", *small])
    batches = predict.trainer.predict_loop.predictions
    assert sum(b["features"].shape[0] for b in batches) == 12
    assert batches[0]["features"].shape[1] == predict.model.backbone.feature_dim
