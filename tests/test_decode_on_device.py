"""``ImageFolder(decode_on_device=True)``: workers read file bytes, JPEGs are decoded as one batch on the device and
cropped there. The views equal decoding on the CPU then the same crops; boxes say where views came from; files the
device decoder cannot take are decoded in workers and counted; a file no decoder reads is named in one line."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Trainer
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ssl_lightning.datamodules import ImageFolder
from ssl_lightning.datamodules.encoded import FileBytes, decode_on_device, decode_rgb, device_decodable
from ssl_lightning.methods import SimSiam
from ssl_lightning.transforms import SimCLRViews
from ssl_lightning.transforms.batched import sample_crop_boxes
from ssl_lightning.transforms.decoded_crops import resized_crops
from tests.test_view_boxes import SIZE, expected_ramp, ramp
from tests.tiny_methods import tiny_method

CROPS_AND_FLIPS = SimCLRViews(
    size=SIZE, scale=(0.1, 0.9), hflip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, num_local=1, local_size=8,
    local_scale=(0.05, 0.3),
)


def smooth_image(seed: int, height: int, width: int) -> Image.Image:
    """A photo-like image: coarse random colours upsampled, so JPEG errors stay small."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def encoded(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **{"format": "JPEG", "quality": 90, **save})
    return buffer.getvalue()


def jpeg_folder(root: Path, count: int = 8) -> Path:
    """``count`` baseline JPEGs of different sizes in two classes."""
    for i in range(count):
        path = root / "train" / ("cat" if i % 2 else "dog") / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(smooth_image(i, 40 + 3 * i, 60 - 2 * i)))
    return root


def device_batch(dm: ImageFolder) -> tuple[dict, dict]:
    """The first training batch as loaded and as the method receives it (device path run on the CPU)."""
    dm.setup("fit")
    loaded = next(iter(dm.train_dataloader()))
    return loaded, dm._device_views(loaded)


def test_device_decoder_takes_baseline_jpegs_only() -> None:
    image = smooth_image(0, 30, 40)
    assert device_decodable(encoded(image)) and device_decodable(encoded(image.convert("L")))
    assert not device_decodable(encoded(image, progressive=True))
    assert not device_decodable(encoded(image.convert("CMYK")))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert not device_decodable(buffer.getvalue())
    assert not device_decodable(b"\xff\xd8\xff\xe0garbage") and not device_decodable(b"")


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.95, 1.0), (0.9, 1.1))])
def test_boxes_per_sample_size_equal_boxes_per_image(scale: tuple, ratio: tuple) -> None:
    """Each image's own size gives the boxes of a call with that size alone (fallbacks included)."""
    sizes = torch.tensor([[375, 500], [500, 375], [40, 90], [90, 40], [64, 64]] * 4)
    u = torch.rand(len(sizes), 22, generator=torch.Generator().manual_seed(3))
    boxes = sample_crop_boxes(u[:, :10], u[:, 10:20], u[:, 20:], sizes[:, 0], sizes[:, 1], scale, ratio)
    for row, (height, width) in enumerate(sizes.tolist()):
        one = sample_crop_boxes(u[row : row + 1, :10], u[row : row + 1, 10:20], u[row : row + 1, 20:], height, width,
                                scale, ratio)
        assert boxes[row].tolist() == one[0].tolist()


def test_views_equal_cpu_decoding_then_the_same_crops(tmp_path: Path) -> None:
    dm = ImageFolder(str(jpeg_folder(tmp_path)), batch_size=8, num_workers=0, views=CROPS_AND_FLIPS,
                     decode_on_device=True)
    loaded, batch = device_batch(dm)
    assert all(isinstance(item, FileBytes) for item in loaded["data"])  # workers only read the files
    moved = move_data_to_device(loaded, torch.device("cpu"))  # as Lightning moves a batch: the bytes stay whole
    assert all(a is b for a, b in zip(moved["data"], loaded["data"]))
    assert len(batch["views"]) == len(batch["boxes"]) == 3 and dm.cpu_decodes == {0: 0}
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    for view, boxes in zip(batch["views"], batch["boxes"]):
        for made, box, index in zip(view, boxes, batch["index"].tolist()):
            image = decode_rgb(dm.train_files[index].read_bytes(), "reference")  # PIL on the CPU
            height, width = image.shape[-2:]
            top, left, h, w = (round(float(v) * side) for v, side in zip(box[:4], (height, width, height, width)))
            crop = TF.resized_crop(image, top, left, h, w, [view.shape[-1]] * 2, antialias=True)
            crop = TF.horizontal_flip(crop) if box[4] else crop
            expected = (crop.float() / 255 - mean) / std
            torch.testing.assert_close(made, expected, atol=2.5 / 255 / min(dm.std), rtol=0)


def test_boxes_say_where_every_view_came_from(tmp_path: Path) -> None:
    pixels = ramp().permute(1, 2, 0).numpy()
    for i in range(16):
        path = tmp_path / "train" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(Image.fromarray(pixels), quality=100, subsampling=0))
    dm = ImageFolder(str(tmp_path), batch_size=16, num_workers=0, views=CROPS_AND_FLIPS, decode_on_device=True)
    _, batch = device_batch(dm)
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    flips = []
    for view, boxes in zip(batch["views"], batch["boxes"]):
        top, left, height, width, flipped = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + height <= 1).all() and (left + width <= 1).all()
        values = (view * std + mean) * 255
        size = view.shape[-1]
        columns, rows = expected_ramp(boxes, size)
        inner = slice(2, size - 2)
        torch.testing.assert_close(values[:, 0, size // 2, inner], columns[:, inner], atol=4.0, rtol=0)
        torch.testing.assert_close(values[:, 1, inner, size // 2], rows[:, inner], atol=4.0, rtol=0)
        flips.append(flipped)
    assert 0 < torch.cat(flips).sum() < len(torch.cat(flips))


def test_png_cmyk_and_progressive_files_are_decoded_in_workers_and_counted(tmp_path: Path) -> None:
    jpeg_folder(tmp_path, count=5)
    cat = tmp_path / "train" / "cat"
    smooth_image(10, 30, 40).save(cat / "plain.png")
    (cat / "cmyk.jpg").write_bytes(encoded(smooth_image(11, 30, 40).convert("CMYK")))
    (cat / "progressive.jpg").write_bytes(encoded(smooth_image(12, 30, 40), progressive=True))
    dm = ImageFolder(str(tmp_path), batch_size=8, num_workers=0, views=CROPS_AND_FLIPS, decode_on_device=True)
    loaded, batch = device_batch(dm)
    on_cpu = {dm.train_files[i].name for i, item in zip(loaded["index"].tolist(), loaded["data"]) if torch.is_tensor(item)}
    assert on_cpu == {"plain.png", "cmyk.jpg", "progressive.jpg"}
    assert dm.cpu_decodes == {0: 3}
    assert [tuple(v.shape) for v in batch["views"]] == [(8, 3, SIZE, SIZE)] * 2 + [(8, 3, 8, 8)]


@pytest.mark.parametrize("kind", ["no_frame", "truncated"])
def test_a_file_no_decoder_reads_is_named_in_one_line(tmp_path: Path, kind: str) -> None:
    jpeg_folder(tmp_path, count=3)
    broken = tmp_path / "train" / "cat" / "broken.jpg"
    data = encoded(smooth_image(5, 40, 50))
    broken.write_bytes(b"\xff\xd8\xff\xe0garbage" if kind == "no_frame" else data[: len(data) // 2])
    dm = ImageFolder(str(tmp_path), batch_size=4, num_workers=0, views=CROPS_AND_FLIPS, decode_on_device=True)
    with pytest.raises(ValueError) as error:
        device_batch(dm)
    message = str(error.value)
    assert "\n" not in message and f"{broken}: cannot be read as an image" in message
    if kind == "truncated":  # passed the header check: named at the batch, with its index
        assert f"training item {dm.train_files.index(broken)} -> {broken}" in message


def test_decode_on_device_needs_views_on_device(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decode_on_device: true needs views_on_device: true"):
        ImageFolder(str(jpeg_folder(tmp_path)), views_on_device=False, decode_on_device=True)


def test_fit_with_decode_on_device(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    jpeg_folder(tmp_path)
    smooth_image(10, 30, 40).save(tmp_path / "train" / "cat" / "plain.png")
    views = SimCLRViews(size=16, blur_p=0.0)
    dm = ImageFolder(str(tmp_path), batch_size=3, num_workers=0, views=views, decode_on_device=True)
    trainer = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with caplog.at_level(logging.INFO):
        trainer.fit(tiny_method(SimSiam), datamodule=dm)
    assert trainer.global_step == 3 and dm.cpu_decodes == {0: 1}  # 3 batches of 3: the whole epoch, the PNG once
    assert "epoch 0: 1 training image file(s) were decoded on the CPU, not the device" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decoder (nvJPEG) needs a GPU")
def test_cuda_decoding_matches_cpu_decoding(tmp_path: Path) -> None:
    files = sorted(jpeg_folder(tmp_path).rglob("*.jpg"))
    data = [FileBytes(path.read_bytes()) for path in files]
    on_gpu, gpu_fallbacks = decode_on_device(data, torch.device("cuda"), str)
    on_cpu, _ = decode_on_device(data, torch.device("cpu"), str)
    assert gpu_fallbacks == 0 and all(image.is_cuda for image in on_gpu)
    for gpu, cpu in zip(on_gpu, on_cpu):
        difference = (gpu.cpu().float() - cpu.float()).abs()
        assert gpu.shape == cpu.shape and difference.mean() < 1.5 and difference.max() <= 16
    boxes = torch.tensor([[2, 3, 20, 30]] * len(files))
    crops = resized_crops(on_gpu, boxes.cuda(), 16).cpu().float()
    torch.testing.assert_close(crops, resized_crops(on_cpu, boxes, 16).float(), atol=8.0, rtol=0)
    dm = ImageFolder(str(tmp_path), batch_size=8, num_workers=0, views=CROPS_AND_FLIPS, decode_on_device=True)
    dm.setup("fit")
    loaded = next(iter(dm.train_dataloader()))
    views = dm._device_views({**loaded, "label": loaded["label"].cuda(), "index": loaded["index"].cuda()})["views"]
    assert [(v.device.type, tuple(v.shape)) for v in views] == [("cuda", (8, 3, SIZE, SIZE))] * 2 + [("cuda", (8, 3, 8, 8))]
