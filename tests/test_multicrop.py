"""Multi-crop views (Caron et al. 2020, SwAV section 3.2): global views then local crops, on the worker
path, the device path with whole images and the device path with crops made in workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from ssl_lightning.callbacks import ViewGridLogger
from ssl_lightning.datamodules import ImageFolder, SyntheticData
from ssl_lightning.datamodules.base import SSLDataModule, TensorImages
from ssl_lightning.transforms import SimCLRViews
from tests.test_datamodules import make_image_folder

B, SIZE, LOCAL, NUM_LOCAL = 8, 32, 16, 3
MULTI = SimCLRViews(size=SIZE, num_local=NUM_LOCAL, local_size=LOCAL, local_scale=(0.1, 0.4))
# Crops only, and the global crop is the whole image: global views must equal the image, local ones differ.
CROPS_ONLY = SimCLRViews(
    size=SIZE,
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    hflip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    num_local=NUM_LOCAL,
    local_size=LOCAL,
    local_scale=(0.05, 0.14),
)
EXPECTED_SHAPES = [(B, 3, SIZE, SIZE)] * 2 + [(B, 3, LOCAL, LOCAL)] * NUM_LOCAL


class RepeatedImage(SSLDataModule):
    """One random image repeated: any difference between the samples' views comes from the recipe."""

    def __init__(self, fixed_size: bool, **kwargs) -> None:
        self.fixed_size = fixed_size
        super().__init__(**kwargs)

    def train_source(self) -> Dataset:
        image = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        return TensorImages(image.expand(B, -1, -1, -1).contiguous(), torch.full((B,), -1))


def training_batch(dm: SSLDataModule) -> list[torch.Tensor]:
    """The views of the first training batch as the method receives them (device path run on the CPU)."""
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return dm._device_views(batch)["views"] if dm.views_on_device else batch["views"]


def n_distinct(views: torch.Tensor) -> int:
    return len({tuple(v.flatten().tolist()) for v in views})


# --- the recipe -------------------------------------------------------------------------------------


def test_recipe_counts_and_local_recipe() -> None:
    assert (SimCLRViews().num_local, SimCLRViews().total_views) == (0, 2)
    assert MULTI.total_views == 2 + NUM_LOCAL
    local = MULTI.local_views()
    assert (local.size, local.scale, local.num_views, local.num_local) == (LOCAL, (0.1, 0.4), NUM_LOCAL, 0)
    assert (local.jitter_p, local.mean) == (MULTI.jitter_p, MULTI.mean)  # the rest of the recipe is shared
    assert len(MULTI.per_sample_views()) == len(MULTI.worker_crops()) == MULTI.total_views


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_local=2), r"local_size must be set \(> 0\) when num_local=2"),
        (dict(num_local=-1), "num_local must be a non-negative integer"),
        (dict(num_local=2, local_size=-16), "local_size must be a non-negative integer"),
        (dict(num_local=2, local_size=16, local_scale=(0.0, 0.1)), r"local_scale must lie in \(0, 1\]"),
        (dict(num_local=2, local_size=16, local_scale=(0.5, 1.5)), r"local_scale must lie in \(0, 1\]"),
        (dict(num_local=2, local_size=16, local_scale=(0.4, 0.1)), "local_scale must be a"),
    ],
)
def test_recipe_rejects_bad_local_crops_by_name(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimCLRViews(**overrides)


def test_local_views_of_a_recipe_without_local_crops_is_an_error() -> None:
    with pytest.raises(ValueError, match="num_local > 0"):
        SimCLRViews().local_views()


# --- batches: counts, sizes, per-sample randomness ----------------------------------------------------


@pytest.mark.parametrize(
    "fixed_size, on_device", [(True, False), (True, True), (False, True)], ids=["workers", "device", "worker_crops"]
)
def test_batches_have_the_counts_sizes_and_per_sample_crops(fixed_size: bool, on_device: bool) -> None:
    dm = RepeatedImage(fixed_size, batch_size=B, num_workers=0, views=CROPS_ONLY, views_on_device=on_device)
    views = training_batch(dm)
    assert [tuple(v.shape) for v in views] == EXPECTED_SHAPES
    assert all(v.dtype == torch.float32 for v in views)
    image = dm._train[0][0].float().div(255)
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    for view in views[:2]:  # global crops at scale 1: the whole image, normalized
        torch.testing.assert_close(view, ((image - mean) / std).expand_as(view), atol=1e-5, rtol=0)
    for view in views[2:]:  # local crops: a different crop for every sample of the same image ...
        assert n_distinct(view) == B
    assert n_distinct(torch.stack(views[2:], dim=1).flatten(1)) == B  # ... and for every view of a sample
    assert all(not torch.equal(views[2][i], views[3][i]) for i in range(B))


def test_image_folder_device_path_crops_both_sizes_in_workers(tmp_path: Path) -> None:
    recipe = SimCLRViews(size=24, num_local=2, local_size=12)
    dm = ImageFolder(str(make_image_folder(tmp_path)), batch_size=4, num_workers=0, views=recipe)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # images of several sizes, cropped in workers
    assert [(tuple(v.shape), v.dtype) for v in batch["views"]] == [((4, 3, 24, 24), torch.uint8)] * 2 + [
        ((4, 3, 12, 12), torch.uint8)
    ] * 2
    views = dm._device_views(batch)["views"]
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 2


def test_worker_path_of_real_data_and_device_path_reproducibility() -> None:
    dm = SyntheticData(num_samples=16, batch_size=B, num_workers=0, views=MULTI, views_on_device=False)
    assert [tuple(v.shape) for v in training_batch(dm)] == EXPECTED_SHAPES
    dm = SyntheticData(num_samples=16, batch_size=B, num_workers=0, views=MULTI)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    first = dm._device_views(batch)["views"]
    assert [tuple(v.shape) for v in first] == EXPECTED_SHAPES
    second = dm._device_views(batch)["views"]  # the next step draws new parameters ...
    assert not any(torch.equal(a, b) for a, b in zip(first, second))
    dm._device_batches = 0  # ... and a resumed run at the same step draws the same ones
    assert all(torch.equal(a, b) for a, b in zip(first, dm._device_views(batch)["views"]))


def test_view_grid_shows_local_crops_next_to_global_views() -> None:
    views = [torch.zeros(B, 3, SIZE, SIZE)] * 2 + [torch.zeros(B, 3, LOCAL, LOCAL)] * NUM_LOCAL
    grid = ViewGridLogger(num_images=2)._grid(views, mean=(0.5,) * 3, std=(0.25,) * 3)
    pad = 2  # make_grid's padding around every cell
    assert grid.shape == (3, 2 * (SIZE + pad) + pad, (2 + NUM_LOCAL) * (SIZE + pad) + pad)
    assert torch.allclose(grid[:, pad : pad + SIZE, -SIZE - pad : -pad], torch.tensor(0.5))  # a local crop, denormalized
