"""Barlow Twins and VICReg on a CUDA GPU at the papers' ImageNet sizes (8192-d projector):
1. the losses under bf16 autocast (computed in float32 inside) against float64 on the same inputs;
2. the losses' forward+backward on a rank's 64 rows (what the all-reduce formulation computes per rank at
   batch 2048 on 32 GPUs) against the 2048 rows a gather formulation computes on every rank, in one run;
3. a few bf16-mixed training steps of ResNet-50 + projector, 2 x 224 px views made on the device.
Run from the repository root: PYTHONPATH=. python3 benchmarks/barlow_vicreg_gpu_check.py
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.losses import barlow_twins_loss, vicreg_loss
from ssl_lightning.methods import BarlowTwins, SSLMethod, VICReg
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews

LOSSES: dict[str, Callable] = {"barlow": barlow_twins_loss, "vicreg": vicreg_loss}


def check_precision(dim: int = 8192, rows: int = 256) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(rows, dim, device="cuda", generator=g)
    z2 = (z1 + 0.5 * torch.randn(rows, dim, device="cuda", generator=g)).bfloat16()
    z1 = z1.bfloat16()
    for name, loss_fn in LOSSES.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours = loss_fn(z1, z2)
        exact = loss_fn(z1.double(), z2.double())
        errors = {field: f"{abs(float(a) - float(b)) / abs(float(b)):.1e}" for field, a, b in zip(ours._fields, ours, exact)}
        print(f"{name} bf16-autocast vs float64, relative error per term: {errors} (dtype {ours.loss.dtype})")


def time_loss(loss_fn: Callable, rows: int, dim: int = 8192, repeats: int = 10) -> float:
    z1 = torch.randn(rows, dim, device="cuda", requires_grad=True)
    z2 = torch.randn(rows, dim, device="cuda", requires_grad=True)
    for _ in range(2):
        loss_fn(z1, z2).loss.backward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        loss_fn(z1, z2).loss.backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run_steps(name: str, model: SSLMethod, steps: int = 8, skip: int = 3) -> None:
    views = SimCLRViews(size=224, scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, blur_p=0.5)
    data = SyntheticData(num_samples=512, image_size=224, batch_size=64, num_workers=0, views=views)
    timer = StepTimer()
    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, limit_val_batches=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, data)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - timer.times[skip]) / (steps - skip)
    metrics = {k: round(float(v), 3) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    print(f"{name}: bf16-mixed step {step_s * 1000:.0f} ms ({64 / step_s:.0f} img/s), "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, {metrics}")


def main() -> None:
    warnings.filterwarnings("ignore")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    check_precision()
    for name, loss_fn in LOSSES.items():
        local, gathered = time_loss(loss_fn, 64), time_loss(loss_fn, 2048)
        print(f"{name} loss fwd+bwd, D=8192 float32: 64 rows {local * 1000:.1f} ms, 2048 rows {gathered * 1000:.1f} ms "
              f"(x{gathered / local:.1f})")
    seed_everything(0, verbose=False)
    common = dict(backbone="resnet50", channels_last=True, projection_hidden_dim=8192, projection_dim=8192)
    run_steps("BarlowTwins resnet50 8192x3", BarlowTwins(
        **common, optim=OptimConfig(name="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=0)))
    run_steps("VICReg resnet50 8192x3", VICReg(
        **common, optim=OptimConfig(name="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=0)))


if __name__ == "__main__":
    main()
