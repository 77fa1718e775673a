"""Datamodules: bundled data offline, image folders (layouts, conversions, clear errors), batches."""

from importlib import resources
from pathlib import Path
from types import SimpleNamespace

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


def test_image_folder_converts_palette_images_to_their_colours(tmp_path: Path) -> None:
    """A palette ("P") image holds colour indices; the loader must give each pixel its palette colour."""
    make_image_folder(tmp_path)
    palette = np.array([[255, 0, 0], [0, 128, 255], [10, 200, 30], [250, 250, 5]], dtype=np.uint8)
    indices = np.random.default_rng(1).integers(0, len(palette), (30, 40), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.flatten().tolist())
    image.save(tmp_path / "train" / "cat" / "palette.png")
    dm = ImageFolder(str(tmp_path), batch_size=4, num_workers=0, views=SimCLRViews(size=16))
    dm.setup("fit")
    with Image.open(tmp_path / "train" / "cat" / "palette.png") as saved:
        assert saved.mode == "P"
    loaded = dm._train[[p.name for p in dm.train_files].index("palette.png")][0]
    expected = torch.from_numpy(palette[indices]).permute(2, 0, 1)  # index -> colour, by hand
    assert loaded.dtype == torch.uint8 and torch.equal(loaded, expected)


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


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_loader_gives_rank_r_every_world_size_th_item(world_size: int) -> None:
    """Rank r of w evaluates items r, r + w, ... of the real datamodule's dataset; together the ranks cover
    every item once (11 items: the shards differ in length)."""
    dm = SyntheticData(num_samples=16, num_val_samples=11, image_size=8, batch_size=4, eval_batch_size=3,
                       num_workers=0, seed=0)
    dm.setup("fit")
    dataset = dm.val_dataset()
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    seen: list[int] = []
    for rank in range(world_size):
        batches = list(dm.eval_loader(dataset, rank=rank, world_size=world_size))
        loaded = torch.cat([batch["image"] for batch in batches])
        labels = torch.cat([batch["label"] for batch in batches])
        indices = [next(i for i in range(len(images)) if torch.equal(row, images[i])) for row in loaded]
        assert indices == list(range(rank, 11, world_size)), (rank, indices)
        assert labels.tolist() == [dataset[i]["label"] for i in indices]
        seen += indices
    assert sorted(seen) == list(range(11))


def _device_views(rank: int, batches: int = 1) -> list[list[torch.Tensor]]:
    """The views the datamodule makes on the device for ``batches`` batches of the same 4 images, as rank ``rank``."""
    dm = SyntheticData(num_samples=8, image_size=16, batch_size=4, num_workers=0, seed=0)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(global_rank=rank, training=True)  # type: ignore[assignment]
    batch = {"image": dm._train.images[:4], "label": dm._train.labels[:4]}
    return [dm.on_after_batch_transfer(dict(batch), 0)["views"] for _ in range(batches)]


def test_device_views_differ_between_ranks_and_repeat_on_the_same_rank() -> None:
    """Same seed, same batch count: rank 1 must not repeat rank 0's crops (with ``seed_everything`` every
    rank has the same global RNG), while the same rank makes the same views again (exact resume)."""
    rank0, rank1, again = _device_views(0, batches=2), _device_views(1)[0], _device_views(0)[0]
    assert [v.shape for v in rank0[0]] == [(4, 3, 16, 16)] * 2
    for view in range(2):
        assert torch.equal(rank0[0][view], again[view])
        for sample in range(4):
            assert not torch.equal(rank0[0][view][sample], rank1[view][sample]), (view, sample)
            assert not torch.equal(rank0[0][view][sample], rank0[1][view][sample]), (view, sample)
