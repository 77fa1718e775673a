"""What every side's worker shares (torch and torchvision only: it runs in each side's own environment):
the CIFAR ResNet-18 for the peers, the input batch, the timing loop and the line protocol with
``benchmarks/peers.py``.

Protocol: the worker reads one JSON request a line on stdin (``method``, ``width``, ``batch``, ``steps``,
``warmup``, ``device``, ``precision``: ``32``, ``tf32`` or ``bf16-mixed``) and answers one line ``RESULT {json}``
on stdout: ``img_per_s`` (images per second, each image two views) and ``threads``, or ``error``. Side-specific
code only builds the step: a loss of two views (under autocast with ``bf16-mixed``) and an update from that loss.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from typing import Callable, ContextManager

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # forward of both views and the loss
UpdateFn = Callable[[torch.Tensor], None]  # backward, optimizer step, EMA / queue where the method has them
BuildStep = Callable[[str, int, int, torch.device], tuple[LossFn, UpdateFn]]
PREFIX = "RESULT "


def cifar_resnet18(width: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), base width ``width`` and no
    ``fc``: the layers of ``ssl_lightning``'s ``cifar_resnet18``, in channels-last. Output: (B, 8 * width)."""
    if width < 16:  # the peers' environments have no ssl_lightning.nn.memory_format to route around oneDNN#6035
        raise ValueError(f"width {width}: channels-last shortcuts narrower than 16 channels hit oneDNN#6035 on the "
                         f"CPU (wrong gradients or a crash); time widths of 16 or more")
    net = ResNet(BasicBlock, [2, 2, 2, 2])  # built at width 64, then re-made at ``width`` below
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.maxpool = nn.Identity()
    for index, planes in enumerate((width, width * 2, width * 4, width * 8), start=1):
        setattr(net, f"layer{index}", net._make_layer(BasicBlock, planes, 2, stride=1 if index == 1 else 2))
    net.fc = nn.Identity()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return net.to(memory_format=torch.channels_last)


def configure(device: torch.device, precision: str) -> None:
    """The same global settings on every side: cuDNN's autotuner on CUDA (convolutions there use TF32 by PyTorch's
    default); ``tf32`` also lets float32 matrix products use TF32 (what stable-pretraining's ``make_it_fast`` sets)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")


def autocast(device: torch.device, precision: str) -> ContextManager:
    """bf16 autocast for ``bf16-mixed``, nothing for ``32`` and ``tf32``."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[torch.Tensor, torch.Tensor], None], batch: int, steps: int, warmup: int,
                      device: torch.device) -> float:
    """Two random channels-last 32x32 views of ``batch`` images; ``warmup`` untimed steps, then ``steps`` timed."""
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, 32, 32, generator=generator).to(device, memory_format=torch.channels_last)
             for _ in range(2)]
    for _ in range(warmup):
        step(*views)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*views)
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def serve(build_step: BuildStep) -> None:
    """Answer requests from ``benchmarks/peers.py`` until stdin closes; a step is built once per configuration."""
    built: dict[tuple, tuple[LossFn, UpdateFn]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            device = torch.device(request["device"])
            configure(device, request["precision"])
            key = (request["method"], request["width"], request["batch"], request["device"])
            if key not in built:
                built.clear()  # one configuration at a time: the previous one's memory is freed first
                torch.manual_seed(0)
                built[key] = build_step(request["method"], request["width"], request["batch"], device)
            loss_fn, update = built[key]

            def step(view1: torch.Tensor, view2: torch.Tensor) -> None:
                with autocast(device, request["precision"]):
                    loss = loss_fn(view1, view2)
                update(loss)

            speed = images_per_second(step, request["batch"], request["steps"], request["warmup"], device)
            answer = {"img_per_s": speed, "threads": torch.get_num_threads()}
        except Exception as error:  # reported to the caller, which prints it and marks the side as failed
            traceback.print_exc(file=sys.stderr)
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(PREFIX + json.dumps(answer), flush=True)
