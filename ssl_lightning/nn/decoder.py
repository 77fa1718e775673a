"""A convolutional decoder from a backbone's feature map back to pixels (colorization, inpainting)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UpsamplingDecoder(nn.Module):
    """``num_upsamplings`` up-convolutions (4x4 transposed conv, stride 2, BatchNorm, ReLU), each doubling
    the resolution and halving the channels down to ``min_channels``, then a 3x3 conv to ``out_channels``
    (the decoder of context encoders, Pathak et al. 2016, sec. 3.1). The output is resized bilinearly to
    the requested size when the strides do not divide it exactly.
    """

    def __init__(self, in_channels: int, out_channels: int, num_upsamplings: int, min_channels: int = 32) -> None:
        super().__init__()
        if num_upsamplings < 0:
            raise ValueError(f"num_upsamplings must be non-negative, got {num_upsamplings}")
        stages: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_upsamplings):
            out = max(min_channels, channels // 2)
            stages += [
                nn.ConvTranspose2d(channels, out, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, in_channels, h, w) -> (B, out_channels, *size)."""
        y = self.out(self.stages(features))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y
