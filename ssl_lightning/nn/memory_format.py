"""Channels-last memory format for convolutional networks, around a oneDNN bug in narrow 1x1 strided convolutions.

oneDNN's backward-weights kernel for 1x1 strided convolutions on x86 CPUs (its "reduce to unit stride" path)
writes past its workspace when the input is channels-last and has fewer channels than the kernel's channel block
(8 floats on AVX2, 16 on AVX-512): wrong weight gradients, hangs or heap corruption (uxlfoundation/oneDNN#6035,
open; seen with torch 2.14.1 on an AVX2 EPYC: a width-4 CIFAR ResNet-18 aborts with 1 thread and gets weight
gradients off by 8% with 2). On the CPU, those convolutions (a narrow ResNet's downsampling shortcuts) keep every
``stride``-th pixel first and then run at stride 1, which is the same function and does not take that path; in
eager mode and under ``torch.compile`` alike, whatever layout the compiler gives the input.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


# the widest channel block of oneDNN's float32 1x1 convolutions on x86 (16 floats, AVX-512; 8 with AVX2), used on
# every CPU: subsampling all three shortcuts of a width-16 CIFAR ResNet-18 costs 1.02-1.05x its step
# (benchmarks/results/narrow_shortcuts_cpu.txt), and only narrower networks are subsampled at all
ONEDNN_WIDEST_CHANNEL_BLOCK = 16


class SubsampledPointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution with a stride and no padding that, on the CPU, subsamples its input and convolves at
    stride 1 (the same output; see the module's docstring). Same parameters and state-dict keys as ``nn.Conv2d``."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not input.is_cpu:
            return super()._conv_forward(input, weight, bias)
        step_h, step_w = self.stride
        return F.conv2d(input[:, :, ::step_h, ::step_w], weight, bias, 1, 0, 1, self.groups)


def is_strided_pointwise(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` with a 1x1 kernel, a stride and no padding (a ResNet's downsampling shortcut)."""
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.padding == (0, 0))


def needs_subsampling_on_cpu(module: nn.Module) -> bool:
    """A strided pointwise convolution with fewer input channels than oneDNN's widest channel block."""
    return is_strided_pointwise(module) and module.in_channels < ONEDNN_WIDEST_CHANNEL_BLOCK


def to_channels_last(network: nn.Module, subsample: Callable[[nn.Module], bool] = needs_subsampling_on_cpu) -> nn.Module:
    """``network`` in channels-last memory format, each convolution of ``subsample`` replaced by a
    ``SubsampledPointwiseConv2d`` holding the same parameters (state-dict keys and values do not change)."""
    for name, module in list(network.named_modules()):
        if subsample(module):
            parent_name, _, child_name = name.rpartition(".")
            replacement = SubsampledPointwiseConv2d(module.in_channels, module.out_channels, 1, module.stride,
                                                    groups=module.groups, bias=module.bias is not None)
            replacement.weight, replacement.bias = module.weight, module.bias
            setattr(network.get_submodule(parent_name), child_name, replacement.train(module.training))
    return network.to(memory_format=torch.channels_last)
