"""Channels-last backbones train with the gradients of contiguous ones, also where oneDNN's channels-last 1x1
strided convolution is wrong (narrow inputs; ``ssl_lightning.nn.memory_format``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ssl_lightning.backbones import build_backbone
from ssl_lightning.nn.memory_format import needs_contiguous_on_cpu, to_channels_last

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


def test_only_narrow_strided_1x1_convolutions_stay_contiguous() -> None:
    network = build_backbone("cifar_resnet18", base_width=4)
    keys = list(network.state_dict())
    network = to_channels_last(network)
    assert list(network.state_dict()) == keys
    narrow = [name for name, module in network.named_modules() if needs_contiguous_on_cpu(module)]
    assert narrow == ["layer2.0.downsample.0", "layer3.0.downsample.0"]  # 4 -> 8 and 8 -> 16 channels; 16 -> 32 is wide
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.Conv2d):  # 1x1 kernels are "contiguous" in both formats: compare strides
            format = torch.contiguous_format if name in narrow else torch.channels_last
            assert module.weight.stride() == module.weight.clone(memory_format=format).stride(), name
    inputs = []
    shortcut = network.layer2[0].downsample
    shortcut[0].register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    features = shortcut(torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last))
    assert inputs[0].is_contiguous() and not inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert features.is_contiguous(memory_format=torch.channels_last)  # the next layer sees channels-last
