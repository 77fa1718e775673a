"""Channels-last memory format for convolutional networks, except where oneDNN's CPU kernel is wrong.

oneDNN's backward-weights kernel for 1x1 strided convolutions on x86 CPUs (its "reduce to unit stride" path)
writes past its workspace when the input is channels-last and has fewer channels than the kernel's channel block
(8 floats on AVX2, 16 on AVX-512): wrong weight gradients, hangs or heap corruption (uxlfoundation/oneDNN#6035,
open; seen with torch 2.14.1 on an AVX2 EPYC: a width-4 CIFAR ResNet-18 aborts with 1 thread and gets
gradients off by 1e3 with 2). Those convolutions (a narrow ResNet's downsampling shortcuts) run in the contiguous
format on the CPU: their weight stays contiguous, a hook hands them a contiguous input and gives the next layer
a channels-last output. Every other layer, and every layer on a GPU, runs channels-last.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

# the widest channel block of oneDNN's float32 1x1 convolutions on x86 (AVX-512): narrower inputs are affected
ONEDNN_CHANNEL_BLOCK = 16


def needs_contiguous_on_cpu(module: nn.Module) -> bool:
    """A 1x1 convolution with a stride and fewer input channels than oneDNN's channel block (see the module)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.in_channels < ONEDNN_CHANNEL_BLOCK)


def to_channels_last(network: nn.Module) -> nn.Module:
    """``network`` in channels-last memory format, the convolutions of ``needs_contiguous_on_cpu`` excepted
    (contiguous weights, contiguous inputs on the CPU). State-dict keys and values do not change."""
    network = network.to(memory_format=torch.channels_last)
    for module in network.modules():
        if needs_contiguous_on_cpu(module):
            module.weight.data = module.weight.detach().clone(memory_format=torch.contiguous_format)
            module.register_forward_pre_hook(_contiguous_input_on_cpu)
            module.register_forward_hook(_channels_last_output_on_cpu)
    return network


def _contiguous_input_on_cpu(module: nn.Module, args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
    images = args[0]
    return (images.contiguous(), *args[1:]) if images.is_cpu else None


def _channels_last_output_on_cpu(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
    return output.contiguous(memory_format=torch.channels_last) if output.is_cpu else None
