"""Channels-last backbones train with the gradients of contiguous ones, also where oneDNN's channels-last 1x1
strided convolution is wrong (narrow inputs; ``ssl_lightning.nn.memory_format``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ssl_lightning.backbones import build_backbone
from ssl_lightning.nn.memory_format import (
    SubsampledPointwiseConv2d,
    needs_subsampling_on_cpu,
    to_channels_last,
)

# Run in a fresh process: the oneDNN bug corrupts the heap (an abort) or hangs, which must fail this test, not
# end the test session. Prints the worst relative difference of all gradients. BatchNorm runs on its running
# statistics: with batch statistics the float32 gradients of this loss differ by up to 1e-2 between memory formats
# (and from float64) through cancellation alone, where the bug gives 1e-1 or more.
GRADIENTS_SCRIPT = """
import torch
from ssl_lightning.backbones import build_backbone
from ssl_lightning.nn.memory_format import to_channels_last

torch.manual_seed(0)
reference = build_backbone("cifar_resnet18", base_width=4).eval()
channels_last = to_channels_last(build_backbone("cifar_resnet18", base_width=4)).eval()
channels_last.load_state_dict(reference.state_dict())
worst = 0.0
for step in range(3):
    images = torch.randn(32, 3, 32, 32)
    for network, batch in ((reference, images), (channels_last, images.contiguous(memory_format=torch.channels_last))):
        network.zero_grad()
        network(batch).square().sum().backward()
    expected = torch.cat([parameter.grad.flatten() for parameter in reference.parameters()])
    actual = torch.cat([parameter.grad.flatten() for parameter in channels_last.parameters()])
    worst = max(worst, float((actual - expected).norm() / expected.norm()))
print(worst)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_a_narrow_channels_last_resnet_gets_the_contiguous_gradients(threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", GRADIENTS_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 1e-5


def test_only_narrow_strided_1x1_convolutions_are_subsampled_and_compute_the_same() -> None:
    network = build_backbone("cifar_resnet18", base_width=4)
    state = network.state_dict()
    narrow = [name for name, module in network.named_modules() if needs_subsampling_on_cpu(module)]
    assert narrow == ["layer2.0.downsample.0", "layer3.0.downsample.0"]  # 4 -> 8 and 8 -> 16 channels; 16 -> 32 is wide
    network = to_channels_last(network)
    assert list(network.state_dict()) == list(state)
    replaced = [name for name, module in network.named_modules() if isinstance(module, SubsampledPointwiseConv2d)]
    assert replaced == narrow
    for name, value in network.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    for name, parameter in network.named_parameters():
        if parameter.dim() == 4 and parameter.shape[-1] > 1:  # 1x1 kernels are channels-last in both layouts
            assert parameter.is_contiguous(memory_format=torch.channels_last), name
    shortcut = network.layer2[0].downsample[0]
    for height in (8, 9):  # odd sizes too: the strided convolution's output has ceil(height / 2) rows
        images = torch.randn(2, 4, height, height).contiguous(memory_format=torch.channels_last)
        expected = torch.nn.functional.conv2d(images.contiguous(), shortcut.weight.contiguous(), stride=2)
        torch.testing.assert_close(shortcut(images), expected)
