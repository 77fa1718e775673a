"""The training step near the hardware (issue 13, item 1): SimCLR, BYOL and MoCo v2 on a CIFAR ResNet-18
(width 64), batch 512, device views, through Lightning's ``fit``: eager, ``backbone`` (``compile_backbone`` +
``compile_views``) and ``step`` (``compile_step``: backbone, heads and loss in one graph, + ``compile_views``), with images/s and the model-FLOPs utilisation (FLOPs of one step counted by
``torch.utils.flop_counter`` / measured step time / the device's dense peak).

    PYTHONPATH=. python benchmarks/gpu_step_table.py                      # one GPU (H200 peak: 989 TFLOP/s bf16)
    PYTHONPATH=. python benchmarks/gpu_step_table.py --device cpu --width 8 --batch 64 --steps 3 --warmup 2 \\
        --precision 32-true --peak-tflops 0.05                            # a CPU smoke run of the script
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.flop_counter import FlopCounterMode

from ssl_lightning.datamodules import BundledCIFAR10
from ssl_lightning.methods import BYOL, MoCoV2, SimCLR, SSLMethod
from ssl_lightning.optim import OptimConfig

METHODS: dict[str, tuple[type[SSLMethod], dict[str, Any]]] = {
    "simclr": (SimCLR, {"projection_hidden_dim": 2048, "temperature": 0.2}),
    "byol": (BYOL, {"projection_hidden_dim": 4096, "projection_dim": 256, "prediction_hidden_dim": 4096}),
    "moco_v2": (MoCoV2, {"projection_hidden_dim": 2048, "queue_size": 4096}),
}


class StepTimer(Callback):
    """Images per second over the steps after ``warmup`` (device synchronised at both ends only)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start = warmup, 0, 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and not self.start:
            _synchronize(pl_module.device)
            self.start = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.images += batch["views"][0].shape[0]

    def per_second(self, device: torch.device) -> float:
        _synchronize(device)
        return self.images / (time.perf_counter() - self.start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


VARIANTS = ("eager", "backbone", "step")  # what is compiled (the device views too, unless eager)


def build(name: str, width: int, variant: str) -> SSLMethod:
    seed_everything(0, verbose=False)
    cls, heads = METHODS[name]
    return cls(backbone="cifar_resnet18", backbone_kwargs={"base_width": width}, compile_backbone=variant == "backbone",
               compile_step=variant == "step", optim=OptimConfig(name="lars", lr=1.0, warmup_epochs=1), **heads)


def flops_per_image(name: str, width: int, batch: int, device: str) -> float:
    """Forward + backward FLOPs of one training step (both views, every network), per image."""
    model = build(name, width, "eager").to(device)
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # outside a Trainer
    views = [torch.randn(batch, 3, 32, 32, device=device) for _ in range(2)]
    with FlopCounterMode(display=False) as counter:
        model.training_step({"views": views, "label": torch.full((batch,), -1, device=device)}, 0)["loss"].backward()
    return counter.get_total_flops() / batch


def images_per_second(name: str, args: argparse.Namespace, variant: str) -> float:
    timer = StepTimer(args.warmup)
    trainer = Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision, max_steps=args.warmup + args.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    data = BundledCIFAR10(batch_size=args.batch, num_workers=2, compile_views=variant != "eager")
    trainer.fit(build(name, args.width, variant), data)
    return timer.per_second(trainer.strategy.root_device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation included)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the device (H200 bf16: 989)")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, width {args.width}, batch {args.batch}, {args.precision}, "
          f"{args.steps} timed steps after {args.warmup}")
    print("method  | variant  | img/s      | GFLOP/img | MFU")
    for method in args.methods:
        flops = flops_per_image(method, args.width, args.batch, args.device)
        for variant in args.variants:
            speed = images_per_second(method, args, variant)
            mfu = speed * flops / (args.peak_tflops * 1e12)
            print(f"{method:7s} | {variant:8s} | {speed:10,.0f} | {flops / 1e9:9.2f} | {100 * mfu:5.1f}%")


if __name__ == "__main__":
    main()
