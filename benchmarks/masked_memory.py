"""Memory of a masked method's training step next to a full-image step of the same ViT (issue 12): MAE, I-JEPA
and iBOT at their default mask ratios.

    PYTHONPATH=. python3 benchmarks/masked_memory.py              # bundled configs (tiny ViTs, 32 px), CPU
    PYTHONPATH=. python3 benchmarks/masked_memory.py --imagenet   # the ImageNet recipes (ViT-B/16 ... at 224 px)

For each method it runs one training step of the config's model (through a Lightning Trainer, views made on the
device from synthetic images) and, on the same views, one step of the bare ViT backbone on every patch of every
global view (forward, a mean-square loss, backward). It prints the activation memory saved for backward (unique
tensor storages recorded by ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded: exact and
machine-independent, on CPU too) and, on a GPU, the peak allocated memory of each step, and their ratios.
MAE and I-JEPA drop the masked patches before the encoder, so their encoder holds only the visible tokens; iBOT
replaces masked patches with a mask token and encodes every patch (its ratio shows the cost of its teacher
and heads).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from ssl_lightning.datamodules import SyntheticData

from config_models import build_from_config, placeholder_image_folder

METHODS = ("mae", "ijepa", "ibot")


class SavedActivations:
    """Bytes of the distinct non-parameter storages autograd saves for backward while active."""

    def __init__(self, parameters: list[torch.Tensor]) -> None:
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameter_storages:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class MeasureStep(Callback):
    """Records the saved activations of the forward pass of the first training step, the views it saw, and
    the peak GPU memory of that step."""

    def __init__(self) -> None:
        self.saved: SavedActivations | None = None
        self.views: list[torch.Tensor] = []
        self.peak = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.views = [v.detach().clone() for v in batch["views"]]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.saved = SavedActivations(list(pl_module.parameters())).__enter__()

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # type: ignore[no-untyped-def]
        assert self.saved is not None
        self.saved.__exit__(None, None, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def full_image_step(backbone: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(saved activation bytes, peak GPU bytes) of the bare ViT on every patch of ``images``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    backbone.train()
    autocast: Callable[..., Any] = torch.autocast("cuda", dtype=torch.bfloat16) if torch.cuda.is_available() else torch.autocast("cpu", enabled=False)
    with SavedActivations(list(backbone.parameters())) as saved, autocast:
        loss = backbone(images).float().square().mean()
    loss.backward()
    backbone.zero_grad(set_to_none=True)
    peak = 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return saved.total, peak


def measure(method: str, imagenet: bool, batch_size: int, root: Path) -> str:
    config = Path("configs") / f"{method}_{'imagenet' if imagenet else 'bundled'}.yaml"
    if not config.exists():
        return f"{method}: no {config}"
    cli = build_from_config(config, root if imagenet else None)
    model, views = cli.model, cli.datamodule.views
    seed_everything(0, verbose=False)
    data = SyntheticData(num_samples=batch_size, image_size=views.size, batch_size=batch_size, num_workers=0,
                         views=views, views_on_device=True)
    step = MeasureStep()
    gpu = torch.cuda.is_available()
    trainer = Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
                      max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[step])
    trainer.fit(model, data)
    assert step.saved is not None
    global_views = torch.cat(step.views[: views.num_views])
    full_saved, full_peak = full_image_step(model.backbone, global_views)
    line = (f"{method} ({config.name}, {cli.config.fit.model.init_args.backbone}, batch {batch_size}, "
            f"{views.num_views}x{views.size}px + {views.num_local} local): saved activations {step.saved.total / 2**20:.1f} MiB "
            f"vs the full-image ViT step {full_saved / 2**20:.1f} MiB (ratio {step.saved.total / full_saved:.2f})")
    if gpu:
        line += f"; GPU peak {step.peak / 2**30:.2f} GiB vs {full_peak / 2**30:.2f} GiB (ratio {step.peak / full_peak:.2f})"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imagenet", action="store_true", help="the ImageNet recipes instead of the bundled ones")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = placeholder_image_folder(Path(tmp))
        for method in args.methods:
            try:
                line = measure(method, args.imagenet, args.batch_size, root)
            except Exception as error:  # one method's failure must not hide the others' results
                line = f"{method}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:300]}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
