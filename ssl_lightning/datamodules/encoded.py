"""Image files read as bytes in DataLoader workers and decoded in batches on the training device.

Workers only read each file; baseline 8-bit JPEGs (grey or YCbCr) travel as their bytes and are decoded as one
list by ``torchvision.io.decode_jpeg`` on the batch's device (nvJPEG on CUDA, libjpeg on the CPU). Files the device
decoder cannot take (PNG and other formats, CMYK, progressive or 12-bit JPEGs) are decoded in the worker on the
CPU instead (PIL), and arrive as uint8 (3, H, W) images. torchvision's CUDA decoder would take progressive JPEGs,
but one at a time with host-side Huffman decoding in the training process: workers do that better.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

#: start-of-frame markers nvJPEG decodes in batches: baseline and extended sequential Huffman
DEVICE_FRAMES = (0xC0, 0xC1)
_NOT_FRAMES = (0xC4, 0xC8, 0xCC)  # DHT, JPG extension, DAC share the 0xC? range
_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: markers without a segment



class FileBytes:
    """A file's bytes, kept whole by collation and by Lightning's move to the device (which walks ``bytes``, a
    sequence, one byte at a time: seconds per batch)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


Encoded = Union[FileBytes, torch.Tensor]  # a file's bytes, or its image decoded on the CPU


def decode_rgb(data: bytes, where: str) -> torch.Tensor:
    """An encoded image (any format PIL reads) as a uint8 (3, H, W) tensor; errors name ``where`` in one line."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return pil_to_tensor(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot be read as an image ({err})") from err


def device_decodable(data: bytes) -> bool:
    """Whether ``data`` is a JPEG the device decoder takes: its first frame header is baseline or extended
    sequential, 8 bits per sample, with 1 or 3 components (not CMYK)."""
    if data[:2] != b"\xff\xd8":
        return False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF or marker in _NO_LENGTH:  # fill byte, or a marker without a segment
            i += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:  # the frame header: precision, size, components
            return marker in DEVICE_FRAMES and i + 10 <= len(data) and data[i + 4] == 8 and data[i + 9] in (1, 3)
        if marker == 0xDA:  # a scan before any frame header
            return False
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


class EncodedFiles(Dataset):
    """``{"data", "label", "index"}`` from files: ``data`` is the file's bytes when the device decoder reads them,
    otherwise the image decoded here (uint8 (3, H, W)); a file no decoder reads fails naming it."""

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        data = path.read_bytes()
        image: Encoded = FileBytes(data) if device_decodable(data) else decode_rgb(data, str(path))
        return {"data": image, "label": self.labels[index], "index": index}


def collate_encoded(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch keeping ``data`` as a list (bytes of different lengths, images of different sizes)."""
    return {
        "data": [item["data"] for item in items],
        "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


def decode_on_device(
    data: list[Encoded], device: torch.device, name: Callable[[int], str]
) -> tuple[list[torch.Tensor], int]:
    """The batch's images on ``device`` and how many of them were decoded on the CPU.

    The files' bytes are decoded as one list on ``device``; images decoded by the workers are already there (the
    batch was moved). When the device decoder refuses the list (a file whose header passed but whose data it
    cannot read), its files are decoded one by one on the CPU; a file no decoder reads raises a ValueError naming
    it (``name(position in the batch)``).
    """
    encoded = [i for i, item in enumerate(data) if isinstance(item, FileBytes)]
    images: list[Any] = list(data)
    on_cpu = len(data) - len(encoded)
    if encoded:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders; read-only buffers are not written
            warnings.simplefilter("ignore")
            buffers = [torch.frombuffer(data[i].data, dtype=torch.uint8) for i in encoded]  # type: ignore[union-attr]
            try:
                decoded = decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                decoded = [decode_rgb(data[i].data, name(i)).to(device) for i in encoded]  # type: ignore[union-attr]
                on_cpu += len(encoded)
        for i, image in zip(encoded, decoded):
            images[i] = image
    return images, on_cpu
