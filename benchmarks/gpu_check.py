"""GPU paths in one short run: CUDA, device-side views, 32-true / 16-mixed / bf16-mixed training, throughput.

Prints one line per check and ratios measured in this run (device-side views vs per-sample workers).
Run via ``benchmarks/gpu_check.sh`` on a machine with a CUDA GPU.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from ssl_lightning.callbacks import KNNMonitor
from ssl_lightning.datamodules import BundledCIFAR10
from ssl_lightning.methods import SimCLR
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews


class Throughput(Callback):
    """Images per second over the training batches after the first ``warmup`` ones."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup, self.images, self.start = warmup, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.images == 0:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.images += batch["views"][0].shape[0]

    def per_second(self) -> float:
        torch.cuda.synchronize()
        return self.images / (time.perf_counter() - self.start)


def views_throughput() -> float:
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, device="cuda")
    views, generator = SimCLRViews(size=32).batched(), torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        views(images, generator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        views(images, generator)
    torch.cuda.synchronize()
    return 20 * images.shape[0] / (time.perf_counter() - start)


def train(precision: str, views_on_device: bool, epochs: int = 3, knn: bool = False) -> tuple[float, float, KNNMonitor | None]:
    seed_everything(0)
    model = SimCLR(backbone="cifar_resnet18", projection_hidden_dim=2048, temperature=0.2, channels_last=True,
                   optim=OptimConfig(name="lars", lr=1.0, warmup_epochs=1))
    data = BundledCIFAR10(batch_size=512, num_workers=8, views_on_device=views_on_device)
    speed = Throughput()
    monitor = KNNMonitor(every_n_epochs=1000) if knn else None
    trainer = Trainer(accelerator="gpu", devices=1, precision=precision, max_epochs=epochs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[speed] + ([monitor] if monitor else []), limit_val_batches=0)
    trainer.fit(model, data)
    return speed.per_second(), float(trainer.logged_metrics["train/loss"]), monitor


def main() -> None:
    print(f"cuda: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
    print(f"device-side SimCLR views (32 px, 2 per image counted as 1 image each): {views_throughput():,.0f} img/s")
    results = {}
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        ips, loss = train(precision, views_on_device=True)[:2]
        results[precision] = ips
        print(f"SimCLR cifar_resnet18 batch 512, {precision}, device views: {ips:,.0f} img/s, last loss {loss:.3f}")
    ips_workers, loss = train("bf16-mixed", views_on_device=False)[:2]
    print(f"SimCLR same, bf16-mixed, per-sample views in 8 workers: {ips_workers:,.0f} img/s, last loss {loss:.3f}")
    print(f"ratio device views / worker views (bf16-mixed): {results['bf16-mixed'] / ips_workers:.2f}x")
    print(f"ratio bf16-mixed / 32-true (device views): {results['bf16-mixed'] / results['32-true']:.2f}x")
    _, _, monitor = train("bf16-mixed", views_on_device=True, epochs=30, knn=True)
    print(f"bundled SimCLR, ResNet-18 width 64, 30 epochs bf16-mixed on GPU: knn_top1 before={monitor.before:.2f} after={monitor.after:.2f}")


if __name__ == "__main__":
    main()
