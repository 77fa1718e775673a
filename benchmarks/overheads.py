"""What a ``fit`` epoch costs beyond the model's steps (issue 13, item 6), on the quickstart's SimCLR
(``configs/simclr_bundled.yaml``: CIFAR ResNet-18 width 8, batch 64, the bundled 5,000 images):

(a) step only: ``training_step`` + backward + AdamW on view batches made beforehand;
(b) a ``fit`` epoch with the views made on the device (eager, then compiled with ``compile_views``), no callbacks;
(c) the same epoch with ``OnlineLinearProbe``; (d) with ``KNNMonitor``, whose cost per epoch at its default
frequency (every 10th epoch, ``configs/base.yaml``) is its own cost / 10;
(e) an MAE step at mask ratio 0.75 against a full-image step (every patch through encoder and decoder) of the
same ViT (``--mae-backbone``, default ``mae_vit_base`` at 224 px with the paper's 8-block 512-d decoder, batch 8).

Each figure is the best of ``--repeats`` runs (fit: epochs after the first); the ratios come from this one run.
Run it alone.
Usage: ``python benchmarks/overheads.py [--batches 78] [--repeats 2]``; ``--mae-only --mae-backbone mae_vit_large`` measures (e) alone.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.flop_counter import FlopCounterMode

from ssl_lightning.callbacks import KNNMonitor, OnlineLinearProbe
from ssl_lightning.datamodules import BundledCIFAR10
from ssl_lightning.methods import MAE, SimCLR
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews

warnings.filterwarnings("ignore")
BATCH = 64


def best_of(repeats: int, run: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def quickstart_model() -> SimCLR:
    seed_everything(0, verbose=False)
    optim = OptimConfig(name="adamw", lr=4e-3, weight_decay=1e-4, warmup_epochs=1)
    return SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 8}, projection_hidden_dim=512,
                  temperature=0.2, optim=optim)


def quickstart_data(compile_views: bool = False) -> BundledCIFAR10:
    return BundledCIFAR10(batch_size=BATCH, num_workers=0, views=SimCLRViews(size=32, scale=(0.2, 1.0)),
                          compile_views=compile_views)


def step_only_seconds(batches: int, repeats: int) -> float:
    """``batches`` optimizer steps on view batches made beforehand (no data, logging or callbacks)."""
    model = quickstart_model()
    data = quickstart_data()
    data.setup("fit")
    images = torch.stack([data._train[i][0] for i in range(batches * BATCH)]).split(BATCH)
    generator = torch.Generator().manual_seed(0)
    views = [data.views.batched()(x.repeat(2, 1, 1, 1), generator, views=2).chunk(2) for x in images]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer: logging is off here

    def run() -> None:
        for pair in views:
            loss = model.training_step({"views": list(pair), "label": torch.full((BATCH,), -1)}, 0)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run()  # warm-up
    return best_of(repeats, run)


class EpochTimer(Callback):
    """Seconds of each training epoch, validation included (from its start to its end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def fit_epoch_seconds(batches: int, epochs: int, callbacks: Callable[[], list[Callback]], compile_views: bool = False,
                      validate: bool = False) -> float:
    """The fastest of ``epochs`` - 1 ``fit`` epochs of ``batches`` steps after the first (start-up, compilation)."""
    timer = EpochTimer()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=batches,
                      limit_val_batches=1.0 if validate else 0, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer, *callbacks()])
    trainer.fit(quickstart_model(), datamodule=quickstart_data(compile_views))
    return min(timer.seconds[1:])


def mae_ratio(backbone: str, image_size: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """Seconds of an MAE step at mask ratio 0.75 (encoder on the visible quarter, decoder, loss) and of a
    full-image step of the same ViT (every patch through the encoder, a mean-square loss on its features), and the
    ratio of their FLOPs (forward and backward, counted by ``torch.utils.flop_counter``)."""
    seed_everything(0, verbose=False)
    model = MAE(backbone=backbone, backbone_kwargs={"image_size": image_size}, mask_ratio=0.75)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, image_size, image_size)
    generator = torch.Generator().manual_seed(0)
    losses = {
        "masked": lambda: model.masked_loss(images, generator)[0],
        "full": lambda: model.backbone(images).pow(2).mean(),
    }
    seconds, flops = [], []
    for loss_of in losses.values():

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_of().backward()
            optimizer.step()

        with FlopCounterMode(display=False) as counter:
            step()
        flops.append(counter.get_total_flops())
        seconds.append(best_of(repeats, step))
    return seconds[0], seconds[1], flops[0] / flops[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=78, help="steps per epoch (78: the whole bundled set)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mae-backbone", default="mae_vit_base")
    parser.add_argument("--mae-image-size", type=int, default=224)
    parser.add_argument("--mae-batch", type=int, default=8)
    parser.add_argument("--knn-every", type=int, default=10, help="the KNNMonitor's default frequency (base.yaml)")
    parser.add_argument("--mae-only", action="store_true", help="measure (e) alone, e.g. with --mae-backbone mae_vit_large")
    args = parser.parse_args()
    if args.mae_only:
        print_mae_ratio(args)
        return
    print(f"threads {torch.get_num_threads()}, {args.batches} steps of batch {BATCH} per epoch, best of {args.repeats}")
    step = step_only_seconds(args.batches, args.repeats)
    epochs = args.repeats + 1
    fit_eager = fit_epoch_seconds(args.batches, epochs, lambda: [])
    fit_compiled = fit_epoch_seconds(args.batches, epochs, lambda: [], compile_views=True)
    validate = fit_epoch_seconds(args.batches, epochs, lambda: [], compile_views=True, validate=True)
    probe = fit_epoch_seconds(args.batches, epochs, lambda: [OnlineLinearProbe()], compile_views=True, validate=True)
    knn = fit_epoch_seconds(args.batches, epochs, lambda: [KNNMonitor(every_n_epochs=1, evaluate_before_training=False,
                            print_summary=False)], compile_views=True, validate=True)
    print(f"(a) step only:                    {step:7.2f} s")
    print(f"(b) fit epoch, eager views:       {fit_eager:7.2f} s = {fit_eager / step:5.3f} x step only")
    print(f"(b) fit epoch, compiled views:    {fit_compiled:7.2f} s = {fit_compiled / step:5.3f} x step only")
    print(f"(c) + OnlineLinearProbe:          {probe:7.2f} s vs {validate:7.2f} s with validation alone: "
          f"+{100 * (probe - validate) / validate:4.1f}% per epoch")
    knn_cost = (knn - validate) / args.knn_every
    print(f"(d) + KNNMonitor every epoch:     {knn:7.2f} s; every {args.knn_every}th epoch: "
          f"+{100 * knn_cost / validate:4.1f}% per epoch")
    print_mae_ratio(args)


def print_mae_ratio(args: argparse.Namespace) -> None:
    masked, full, flop_ratio = mae_ratio(args.mae_backbone, args.mae_image_size, args.mae_batch, args.repeats)
    print(f"(e) {args.mae_backbone} MAE step at mask 0.75: {masked:6.3f} s, full-image step {full:6.3f} s: ratio "
          f"{masked / full:5.3f} (FLOPs ratio {flop_ratio:5.3f})")


if __name__ == "__main__":
    main()
