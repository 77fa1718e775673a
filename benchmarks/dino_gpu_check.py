"""DINO on a CUDA GPU: a CIFAR ResNet in 16-mixed (GradScaler: clipping and the frozen last layer act on
unscaled gradients) and the ViT-S/16 ImageNet recipe (2x224 + 10x96 crops, K = 65536) in bf16-mixed,
views made on the device. Prints the loss, the center, the weight decay, step time and peak memory.
Run from the repository root: PYTHONPATH=. python3 benchmarks/dino_gpu_check.py
"""

from __future__ import annotations

import time
import warnings

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from ssl_lightning.datamodules import SyntheticData
from ssl_lightning.methods import DINO
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews


class StepTimer(Callback):
    """Wall time of the steps after ``skip`` warm-up steps, synchronized with the GPU."""

    def __init__(self, skip: int) -> None:
        self.skip, self.times = skip, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run(name: str, model: DINO, data: SyntheticData, precision: str, steps: int, skip: int) -> None:
    timer = StepTimer(skip)
    trainer = Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=steps, limit_val_batches=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, data)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - timer.times[skip]) / (steps - skip)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    wd = [g["weight_decay"] for g in trainer.optimizers[0].param_groups]
    print(f"{name}: {precision} step {step_s * 1000:.0f} ms, {data.batch_size / step_s:.0f} img/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, metrics {metrics}, weight decay {wd}, "
          f"center finite {bool(model.center.isfinite().all())} |center| {model.center.norm():.3f}, "
          f"last layer g==1 {bool((model.head.last_layer.parametrizations.weight.original0 == 1).all())}")


def main() -> None:
    warnings.filterwarnings("ignore")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    seed_everything(0, verbose=False)
    cifar = SimCLRViews(size=32, scale=(0.14, 1.0), num_local=6, local_size=16, local_scale=(0.1, 0.4))
    model = DINO(backbone="cifar_resnet18", backbone_kwargs={"base_width": 8}, channels_last=True, out_dim=4096,
                 hidden_dim=512, final_weight_decay=0.4,
                 optim=OptimConfig(name="adamw", lr=4e-3, weight_decay=0.04, warmup_epochs=1))
    data = SyntheticData(num_samples=4096, image_size=32, batch_size=64, num_workers=0, views=cifar)
    run("resnet18-w8 2x32+6x16", model, data, "16-mixed", steps=30, skip=10)

    imagenet = SimCLRViews(size=224, scale=(0.4, 1.0), num_local=10, local_size=96, local_scale=(0.05, 0.4),
                           brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, blur_p=0.5)
    model = DINO(backbone="vit_small", backbone_kwargs={"image_size": 224, "patch_size": 16, "drop_path_rate": 0.1},
                 out_dim=65536, final_weight_decay=0.4,
                 optim=OptimConfig(name="adamw", lr=5e-4, weight_decay=0.04, warmup_epochs=10, min_lr_ratio=5e-4))
    data = SyntheticData(num_samples=1024, image_size=224, batch_size=64, num_workers=0, views=imagenet)
    run("vit_small/16 2x224+10x96", model, data, "bf16-mixed", steps=15, skip=5)


if __name__ == "__main__":
    main()
