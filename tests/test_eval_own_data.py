"""``ssl-lightning eval`` on one's own folder: native-size images kept pixel for pixel, the checkpoint's training
normalization by default (``--mean``/``--std`` override), and ``--random_init`` scoring the untrained network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from ssl_lightning.datamodules import ImageFolder, SSLDataModule
from ssl_lightning.datamodules.base import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from ssl_lightning.eval import command
from ssl_lightning.eval.checkpoint import untrained_method
from ssl_lightning.scoring import extract_features
from ssl_lightning.methods import SimCLR, SSLMethod
from ssl_lightning.transforms import SimCLRViews

SIZE = 32  # the images of the report: a folder of 32 px images


def make_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = SIZE) -> Path:
    """Random lossless PNGs: ``root/{train,val}/c<k>/<i>.png``, ``size`` x ``size`` px."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(classes):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / f"c{k}" / f"{i}.png")
    return root


def files_normalized(root: Path, split: str, mean: Any, std: Any) -> torch.Tensor:
    """The files' pixels scaled to [0, 1] and normalized, in the folder's (sorted) order: the slow reference."""
    paths = sorted(root.glob(f"{split}/*/*.png"))
    pixels = torch.stack([pil_to_tensor(Image.open(p).convert("RGB")) for p in paths]).double() / 255
    return ((pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).float()


def eval_images(dm: ImageFolder, split: str = "val") -> torch.Tensor:
    dm.setup("validate")
    dataset = dm.val_dataset() if split == "val" else dm.train_eval_dataset()
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def test_native_size_images_are_left_as_they_are(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    common = dict(num_workers=0, views=SimCLRViews(size=SIZE))
    expected = files_normalized(root, "val", IMAGENET_MEAN, IMAGENET_STD)
    for native in ({"eval_resize": "none"}, {"eval_crop": "none"}, {"eval_resize": "none", "eval_crop": "none"}):
        dm = ImageFolder(str(root), **common, **native)
        assert torch.allclose(eval_images(dm), expected, atol=1e-6), native
    default = ImageFolder(str(root), **common)  # any-size folders: resized to 37 px, centre-cropped to 32
    assert (default.eval_resize, default.eval_crop) == (37, 32)
    images = eval_images(default)
    assert images.shape == expected.shape and (images - expected).abs().max() > 0.1
    resized = ImageFolder(str(root), **common, eval_resize=64, eval_crop=48)  # explicit sizes are taken
    assert eval_images(resized).shape[-2:] == (48, 48)


def test_bad_eval_sizes_are_refused_by_name(tmp_path: Path) -> None:
    root = make_folder(tmp_path, classes=2, per_class=1)
    with pytest.raises(ValueError, match="eval_resize must be a positive number of pixels or 'none', got 0"):
        ImageFolder(str(root), num_workers=0, eval_resize=0)
    with pytest.raises(ValueError, match="eval_crop must be a positive number of pixels or 'none', got 'native'"):
        ImageFolder(str(root), num_workers=0, eval_crop="native")
    too_small = ImageFolder(str(root), num_workers=0, views=SimCLRViews(size=48), eval_resize="none")
    with pytest.raises(ValueError, match="a 32x32 image is smaller than the 48 px centre crop of evaluation"):
        eval_images(too_small)  # never zero-padded


TINY = ["--model.init_args.backbone=cifar_resnet18", "--model.init_args.backbone_kwargs={base_width: 4}",
        "--model.init_args.projection_hidden_dim=16", "--model.init_args.projection_dim=8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SimCLR step with Lightning's own LightningCLI (what ``ssl-lightning fit`` builds on: its checkpoints
    name the method's class) on 32 px synthetic data (CIFAR-10 statistics, not ImageNet's)."""
    out = tmp_path_factory.mktemp("fit")
    data = ["--data=ssl_lightning.datamodules.SyntheticData", "--data.init_args.num_samples=16", "--data.init_args.num_val_samples=8",
            "--data.init_args.image_size=32", "--data.init_args.num_classes=2", "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0", "--data.init_args.views.size=32"]
    callbacks = f"[{{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {{dirpath: {out}, save_last: true, save_top_k: 0}}}}]"
    LightningCLI(SSLMethod, SSLDataModule, subclass_mode_model=True, subclass_mode_data=True, seed_everything_default=0,
                 auto_configure_optimizers=False, save_config_callback=None,
                 args=["fit", "--model=ssl_lightning.methods.SimCLR", "--trainer.max_steps=1",
                       "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
                       "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.callbacks={callbacks}",
                       f"--trainer.default_root_dir={out}", *TINY, *data])
    return out / "last.ckpt"


def test_training_normalization_is_saved_in_the_checkpoint(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)["datamodule_hyper_parameters"]
    assert saved == {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


def run_eval(root: Path, checkpoint: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str):
    """``ssl-lightning eval`` (kNN) on the folder at native size; returns the metrics and, per split extracted,
    the images the model saw and the features it gave."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(method, loader, device):
        images = torch.cat([batch["image"] for batch in loader])
        features = extract_features(method, loader, device)
        seen.append((images, features[0]))
        return features

    monkeypatch.setattr(command, "extract_features", recording)
    args = [f"--checkpoint={checkpoint}", "--data=ImageFolder", f"--data.init_args.root={root}",
            f"--data.init_args.views.size={SIZE}", "--data.init_args.eval_resize=none", "--data.init_args.num_workers=0",
            f"--output_dir={out}", f"--cache_dir={out.parent / 'cache'}", "--device=cpu", "--protocols=[knn]",
            "--knn.k=[3]", *extra]
    metrics = command.main(args)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    return metrics, seen


def test_eval_uses_native_images_and_the_checkpoints_normalization(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_folder(tmp_path / "folder")
    metrics, seen = run_eval(root, checkpoint, tmp_path / "trained", monkeypatch)
    assert metrics["normalization"] == {"mean": list(CIFAR10_MEAN), "mean_from": "checkpoint",
                                        "std": list(CIFAR10_STD), "std_from": "checkpoint"}
    assert metrics["eval_images"] == {"resize": None, "crop": SIZE} and metrics["random_init"] is False
    (train_images, _), (val_images, _) = seen
    assert torch.allclose(train_images, files_normalized(root, "train", CIFAR10_MEAN, CIFAR10_STD), atol=1e-6)
    assert torch.allclose(val_images, files_normalized(root, "val", CIFAR10_MEAN, CIFAR10_STD), atol=1e-6)
    report = (tmp_path / "trained" / "report.md").read_text()
    assert "Images: not resized, centre-cropped to 32 px; normalized with mean (0.4914, 0.4822, 0.4465) " \
           "(from the checkpoint's training data)" in report

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    metrics, seen = run_eval(root, checkpoint, tmp_path / "given", monkeypatch, f"--mean={mean}", f"--std={std}")
    assert metrics["normalization"] == {"mean": mean, "mean_from": "option", "std": std, "std_from": "option"}
    assert len(seen) == 2, "other normalization, other cache entries"
    assert torch.allclose(seen[1][0], files_normalized(root, "val", mean, std), atol=1e-6)
    with pytest.raises(ValueError, match=r"--std must be 3 numbers \(one per RGB channel\), all > 0, got \[0.0, 1.0, 1.0\]"):
        run_eval(root, checkpoint, tmp_path / "bad", monkeypatch, "--std=[0, 1, 1]")


def test_an_old_checkpoint_falls_back_to_the_datamodules_statistics(tmp_path: Path) -> None:
    options = command.build_parser().parse_args(["--checkpoint=x", "--data=SyntheticData"])
    dm = ImageFolder(str(make_folder(tmp_path, classes=2, per_class=1)), num_workers=0)
    resolved = command.resolve_normalization(options, dm, {"state_dict": {}})
    assert resolved == {"mean": list(IMAGENET_MEAN), "mean_from": "datamodule", "std": list(IMAGENET_STD),
                        "std_from": "datamodule"}


def test_random_init_scores_the_untrained_network_of_the_same_architecture(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_folder(tmp_path / "folder")
    trained, trained_seen = run_eval(root, checkpoint, tmp_path / "trained", monkeypatch)
    random, random_seen = run_eval(root, checkpoint, tmp_path / "random", monkeypatch, "--random_init=true", "--seed=3")
    assert random["random_init"] is True and trained["random_init"] is False
    assert random["checkpoint_sha256"] == trained["checkpoint_sha256"]
    assert len(random_seen) == 2, "the untrained network's features are not read from the trained one's cache"
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 4
    assert not torch.allclose(random_seen[1][1], trained_seen[1][1])
    assert "(random init)" in (tmp_path / "random" / "report.md").read_text()

    # the reference: the same class and hyper-parameters built after torch.manual_seed(3), nothing loaded
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    plain = {k: v for k, v in hparams.items() if not k.startswith("_")}
    assert plain["optim"] is None  # else it would need its dataclass here
    torch.manual_seed(3)
    fresh = SimCLR(**plain).eval()  # optim None: the default recipe (it draws no random numbers)
    untrained = untrained_method(checkpoint, seed=3)
    assert type(untrained) is SimCLR and untrained.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(untrained.state_dict().values(), fresh.state_dict().values()))
    with torch.no_grad():
        assert torch.allclose(fresh(random_seen[1][0]), random_seen[1][1], atol=1e-5)
    trained_weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert not torch.equal(untrained.state_dict()["backbone.conv1.weight"], trained_weights["backbone.conv1.weight"])


def test_the_image_folder_eval_config_keeps_native_images(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "eval" / "image_folder.yaml"
    parser = command.build_parser()
    options = parser.parse_args([f"--config={config}", "--checkpoint=x", f"--data.init_args.root={root}",
                                 "--data.init_args.num_workers=0"])
    assert options.mean is None and options.std is None and options.random_init is False
    dm = parser.instantiate(options).data
    assert (dm.eval_resize, dm.eval_crop) == (None, SIZE)
    assert torch.allclose(eval_images(dm), files_normalized(root, "val", IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)
