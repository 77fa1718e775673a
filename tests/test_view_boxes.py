"""The batch contract's ``boxes``: each view's crop (top, left, height, width) in fractions of the source
image and its flip, on the worker path, the device path and the device path with crops made in workers.
A ramp image whose red channel is the source column and green the source row shows where every output
pixel came from; the boxes must predict it."""

from __future__ import annotations

import pytest
import torch

from ssl_lightning.transforms import SimCLRViews
from tests.view_data import VIEW_PATHS, RepeatedImage

N, HEIGHT, WIDTH, SIZE, STEP = 32, 48, 64, 16, 4  # STEP: ramp value per source pixel
CROPS_AND_FLIPS = SimCLRViews(
    size=SIZE, scale=(0.1, 0.6), hflip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, num_local=1,
    local_size=8, local_scale=(0.05, 0.2),
)


def ramp() -> torch.Tensor:
    """(3, HEIGHT, WIDTH) uint8: red = STEP * column, green = STEP * row."""
    columns = (torch.arange(WIDTH) * STEP).expand(HEIGHT, WIDTH)
    rows = (torch.arange(HEIGHT) * STEP).view(-1, 1).expand(HEIGHT, WIDTH)
    return torch.stack([columns, rows, torch.zeros_like(columns)]).to(torch.uint8)



def expected_ramp(boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ramp values at each output pixel's centre that the boxes predict: (B, size) columns, rows."""
    top, left, height, width, flipped = boxes.unbind(1)
    along = (torch.arange(size) + 0.5) / size
    along_x = torch.where(flipped.view(-1, 1) > 0, 1 - along, along)
    x = WIDTH * (left.view(-1, 1) + along_x * width.view(-1, 1))  # continuous source coordinates
    y = HEIGHT * (top.view(-1, 1) + along * height.view(-1, 1))
    return STEP * (x - 0.5), STEP * (y - 0.5)


@pytest.mark.parametrize(**VIEW_PATHS)
def test_boxes_say_where_every_view_came_from(fixed_size: bool, on_device: bool) -> None:
    dm = RepeatedImage(ramp(), N, fixed_size, batch_size=N, num_workers=0, views=CROPS_AND_FLIPS,
                       views_on_device=on_device)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    if on_device:
        batch = dm._device_views(batch)
    assert batch["index"].sort().values.tolist() == list(range(N))
    assert len(batch["boxes"]) == len(batch["views"]) == 3
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    flips = []
    for view, boxes in zip(batch["views"], batch["boxes"]):
        assert boxes.shape == (N, 5) and boxes.dtype == torch.float32
        top, left, height, width, flipped = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + height <= 1).all() and (left + width <= 1).all()
        pixels = (view * std + mean) * 255
        size = view.shape[-1]
        columns, rows = expected_ramp(boxes, size)
        inner = slice(2, size - 2)  # away from the box edges, where resizing clamps
        torch.testing.assert_close(pixels[:, 0, size // 2, inner], columns[:, inner], atol=3.0, rtol=0)
        torch.testing.assert_close(pixels[:, 1, inner, size // 2], rows[:, inner], atol=3.0, rtol=0)
        flips.append(flipped)
    flips = torch.cat(flips)
    assert 0 < flips.sum() < len(flips)  # both mirrored and plain views were checked
