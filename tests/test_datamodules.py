"""Datamodules: bundled data offline, image folders (layouts, conversions, clear errors), batches."""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lightning.datamodules import BundledCIFAR10, ImageFolder, SyntheticData
from ssl_lightning.datamodules.bundled import ASSET
from ssl_lightning.transforms import SimCLRViews


def test_bundled_cifar10_loads_offline_balanced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.socket.connect", lambda *a, **k: pytest.fail("network access"))
    dm = BundledCIFAR10(batch_size=32, num_workers=0)
    dm.setup("fit")
    train, test = dm._train, dm._val
    assert train.images.shape == (5000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [500] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.images.float().std() > 40  # real images, not blanks
    assert resources.files("ssl_lightning.datamodules").joinpath("assets", ASSET).stat().st_size <= 5_000_000


def _write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(path)


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4) -> Path:
    for split in ("train", "val"):
        for name in classes:
            for i in range(per_class):
                _write_image(root / split / name / f"{i}.png", size=(40 + i, 30))
    return root


def test_image_folder_converts_grayscale_and_rgba_to_rgb(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    _write_image(tmp_path / "train" / "cat" / "gray.png", mode="L")
    _write_image(tmp_path / "train" / "dog" / "alpha.png", mode="RGBA")
    dm = ImageFolder(str(tmp_path), batch_size=4, num_workers=0, views_on_device=False, views=SimCLRViews(size=16))
    dm.setup("fit")
    images = [dm._train[i][0] for i in range(len(dm._train))]
    assert all(img.shape[0] == 3 and img.dtype == torch.uint8 for img in images)
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]
    batch = next(iter(dm.train_dataloader()))
    assert [v.shape for v in batch["views"]] == [(4, 3, 16, 16)] * 2
    assert next(iter(dm.val_dataloader()))["image"].shape[1:] == (3, 16, 16)


def test_image_folder_without_labels_trains_without_validation(tmp_path: Path) -> None:
    for i in range(6):
        _write_image(tmp_path / "train" / f"{i}.jpg")
    dm = ImageFolder(str(tmp_path), batch_size=2, num_workers=0, views=SimCLRViews(size=16))
    dm.setup("fit")
    assert dm.num_classes is None and dm.val_dataset() is None and dm.train_eval_dataset() is None
    assert set(dm._train.labels) == {-1}


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: (root / "train" / "dog" / "notes.txt").write_text("hi"), r"notes\.txt: not an image file"),
        (lambda root: (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8garbage"), None),
        (lambda root: (root / "train" / "empty").mkdir(), r"train/empty: empty class folder"),
    ],
)
def test_image_folder_bad_input_names_the_file(tmp_path: Path, breakage, message) -> None:
    make_image_folder(tmp_path)
    breakage(tmp_path)
    if message is not None:
        with pytest.raises(ValueError, match=message):
            ImageFolder(str(tmp_path))
    else:  # a corrupt image is found when it is read, and named
        dm = ImageFolder(str(tmp_path), batch_size=2, num_workers=0)
        dm.setup("fit")
        index = [p.name for p in dm.train_files].index("broken.jpg")
        with pytest.raises(ValueError, match=r"broken\.jpg: cannot be read as an image"):
            dm._train[index]


def test_missing_data_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(str(tmp_path / "nowhere"))
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data/train"):
        ImageFolder(str(tmp_path / "data"))


def test_cifar10_without_files_says_where_it_looked(tmp_path: Path) -> None:
    from ssl_lightning.datamodules import CIFAR10

    dm = CIFAR10(root=str(tmp_path / "cifar"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="cifar.*download=true"):
        dm.setup("fit")


def test_worker_path_batches_and_device_path_state_roundtrip() -> None:
    dm = SyntheticData(num_samples=16, batch_size=8, num_workers=0, views_on_device=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert [v.shape for v in batch["views"]] == [(8, 3, 32, 32)] * 2 and batch["views"][0].dtype == torch.float32
    assert not torch.equal(batch["views"][0], batch["views"][1])
    dm._device_batches = 7
    other = SyntheticData(num_samples=16, batch_size=8)
    other.load_state_dict(dm.state_dict())
    assert other._device_batches == 7


def test_batch_larger_than_dataset_is_a_clear_error() -> None:
    dm = SyntheticData(num_samples=8, batch_size=16, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="batch_size=16 is larger than the 8 training images"):
        dm.train_dataloader()
