"""The ViT methods on one GPU: a short fit of each ImageNet recipe (its model and views, on synthetic images of
the recipe's size) in bf16-mixed, printing images/s, peak memory and the last loss.

    PYTHONPATH=. python3 benchmarks/vit_methods_gpu_check.py                 # GPU: configs/<m>_imagenet.yaml
    PYTHONPATH=. python3 benchmarks/vit_methods_gpu_check.py --tiny          # CPU dry run: configs/<m>_bundled.yaml

The model and the view recipe come from the config through the CLI (``run_cli(..., run=False)``); the data is
``SyntheticData`` at the recipe's global crop size with the recipe's views made on the device, so no dataset is
needed. ``--tiny`` runs 2 steps of each bundled config on the CPU in fp32 (checks the script, not the speed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from ssl_lightning.datamodules import SyntheticData

from config_models import build_from_config, placeholder_image_folder

METHODS = ("dino", "mae", "ibot", "dinov2", "ijepa", "simmim", "msn", "aim", "lejepa")


class StepTimer(Callback):
    """Wall time of each training step (synchronized with the GPU when there is one)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


def fit_once(method: str, tiny: bool, batch_size: int, steps: int, warmup: int, root: Path) -> str:
    config = Path("configs") / f"{method}_{'bundled' if tiny else 'imagenet'}.yaml"
    if not config.exists():
        return f"{method}: no {config}"
    cli = build_from_config(config, None if tiny else root)
    model, views = cli.model, cli.datamodule.views
    seed_everything(0, verbose=False)
    data = SyntheticData(num_samples=batch_size * (steps + 1), image_size=views.size, batch_size=batch_size,
                         num_workers=0 if tiny else 8, views=views, views_on_device=True)
    timer = StepTimer()
    trainer = Trainer(accelerator="cpu" if tiny else "gpu", devices=1, precision="32-true" if tiny else "bf16-mixed",
                      max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, data)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - timer.starts[warmup]) / (steps - warmup)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else "n/a (CPU)"
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    backbone = cli.config.fit.model.init_args.backbone
    return (f"{method}: {backbone} {views.num_views}x{views.size}px + {views.num_local}x{views.local_size}px, "
            f"batch {batch_size}, {trainer.precision}: {batch_size / step_s:,.0f} img/s, peak {peak}, "
            f"last loss {loss:.4f}, finite {bool(torch.isfinite(torch.tensor(loss)))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2 steps of the bundled configs on the CPU")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.tiny:
        args.batch_size, args.steps = 8, 3
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = placeholder_image_folder(Path(tmp))
        for method in args.methods:
            try:
                line = fit_once(method, args.tiny, args.batch_size, args.steps, 1 if args.tiny else 5, root)
            except Exception as error:  # one method's failure must not hide the others' results
                line = f"{method}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:300]}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
