"""Asymmetric view recipes (BYOL, Grill et al. 2020, table 6): each global view with its own blur and
solarization probabilities, on the worker path, the device path and the device path with worker crops.
Over many samples, the fraction of blurred and of solarized images per view must match the recipe."""

from __future__ import annotations

import pytest
import torch

from ssl_lightning.transforms import SimCLRViews
from ssl_lightning.transforms.batched import solarize
from tests.view_data import VIEW_PATHS, RepeatedImage

N, SIZE = 600, 32
PER_VIEW = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})
BYOL_LIKE = SimCLRViews(
    size=SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
    blur_min_size=SIZE, blur_sigma=(1.0, 2.0), per_view=PER_VIEW,
)


def checkerboard() -> torch.Tensor:
    """(3, SIZE, SIZE) uint8 of 150 and 250: solarization drops the mean below 128, blur the contrast."""
    board = (torch.arange(SIZE).view(-1, 1) + torch.arange(SIZE)) % 2
    return (150 + 100 * board).to(torch.uint8).expand(3, SIZE, SIZE).contiguous()



@pytest.mark.parametrize(**VIEW_PATHS)
def test_each_view_is_blurred_and_solarized_at_its_own_rate(fixed_size: bool, on_device: bool) -> None:
    dm = RepeatedImage(checkerboard(), N, fixed_size, batch_size=N, num_workers=0, views=BYOL_LIKE,
                       views_on_device=on_device)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    views = dm._device_views(batch)["views"] if on_device else batch["views"]
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    for view, recipe in zip(views, PER_VIEW):
        pixels = (view * std + mean) * 255
        solarized = pixels.mean(dim=(1, 2, 3)) < 128
        contrast = pixels.diff(dim=-1).abs().mean(dim=(1, 2, 3))
        blurred = contrast < 0.6 * 100
        assert abs(blurred.float().mean() - recipe["blur_p"]) < 0.06, (recipe, blurred.float().mean())
        assert abs(solarized.float().mean() - recipe["solarize_p"]) < 0.06, (recipe, solarized.float().mean())


def test_solarize_inverts_from_128_like_torchvision() -> None:
    import torchvision.transforms.v2.functional as TF

    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    expected = TF.solarize(x, 128).float() / 255
    torch.testing.assert_close(solarize(x.float() / 255), expected, atol=1e-6, rtol=0)


def test_local_crops_keep_the_recipes_probabilities() -> None:
    recipe = SimCLRViews(size=SIZE, blur_p=0.5, num_local=2, local_size=16, per_view=PER_VIEW)
    assert recipe.local_views().view_probabilities("blur_p") == (0.5, 0.5)
    assert recipe.view_probabilities("solarize_p") == (0.0, 0.2)


@pytest.mark.parametrize(
    "per_view, message",
    [
        (({"blur_p": 1.0},), r"per_view has 1 entries for num_views=2"),
        (({"blur_p": 1.0}, {"size": 16}), r"per_view\[1\] sets 'size'"),
        (({"blur_p": 1.0}, {"solarize_p": 1.5}), r"per_view\[1\]\.solarize_p is a probability"),
    ],
)
def test_bad_per_view_settings_are_named(per_view: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimCLRViews(per_view=per_view)
