"""Export a trained backbone as a plain state dict for the matching torchvision / timm model, with a model card.

What exports (``export_target`` says why anything else does not):

- ``resnet18/34/50`` and ``cifar_resnet18/34/50`` at ``base_width=64`` -> ``torchvision.models.resnetXX``
  with ``fc = nn.Identity()``; the CIFAR stem is two more lines (3x3 stride-1 ``conv1``, ``maxpool =
  nn.Identity()``). Other widths cannot be expressed: torchvision's and timm's ResNets fix the stem at 64
  channels (timm's ``channels`` changes the stages only, and its ``stem_width`` only the deep stems).
- ``vit_tiny/small/base`` (timm already) -> ``timm.create_model(name, num_classes=0, img_size, patch_size)``.
- MAE's encoder ``mae_vit_*`` -> the same timm ViT: its keys map one to one (``patch_embed.*`` becomes
  ``patch_embed.proj.*``; the fixed sin-cos ``pos_embed`` buffer becomes timm's ``pos_embed`` parameter,
  class position included as timm adds it). The class-token feature (``global_pool="cls"``) is timm's
  ``global_pool="token"``; the mean of the normed patch tokens (``"mean"``) is ``global_pool="avg"`` with
  ``fc_norm=False`` (timm would otherwise norm after pooling instead of before).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import yaml
from torch import nn

from ssl_lightning.backbones import _CONVNEXTS, _MAE_VITS, _RESNET_LAYOUTS, _VITS, TimmViT, build_backbone
from ssl_lightning.eval.cache import file_sha256
from ssl_lightning.eval.checkpoint import load_checkpoint_safely, load_method
from ssl_lightning.methods.base import SSLMethod

WEIGHTS_FILE = "backbone.pt"
CARD_FILE = "model_card.md"
_RESNET_NAME = re.compile(rf"^(cifar_)?({'|'.join(_RESNET_LAYOUTS)})$")
_MAE_KWARGS = {"image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "global_pool"}


@dataclass(frozen=True)
class ExportTarget:
    """The plain model a backbone exports to: ``library`` (``torchvision`` or ``timm``), the model's name and
    constructor arguments, the CIFAR stem swap (torchvision), and the key renames (old prefix, new prefix)."""

    library: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    cifar_stem: bool = False
    renames: tuple[tuple[str, str], ...] = ()


def _vit_dynamic_default() -> bool:
    """Our ``TimmViT``'s ``dynamic_img_size`` default (timm's own is False): the export keeps the behaviour."""
    parameter = inspect.signature(TimmViT).parameters.get("dynamic_img_size")
    return bool(parameter is not None and parameter.default)


def export_target(backbone: str, backbone_kwargs: Optional[Mapping[str, Any]] = None) -> ExportTarget:
    """The torchvision/timm model matching backbone ``backbone`` built with ``backbone_kwargs``.

    Raises ``ValueError`` naming the reason when the backbone has no plain equivalent.
    """
    kwargs = dict(backbone_kwargs or {})
    resnet = _RESNET_NAME.match(backbone)
    if resnet:
        width = kwargs.pop("base_width", 64)
        if kwargs:
            raise ValueError(f"backbone {backbone!r}: unexpected backbone_kwargs {sorted(kwargs)} for export")
        if width != 64:
            raise ValueError(
                f"backbone {backbone!r} with base_width={width} cannot be exported: torchvision's and timm's "
                "ResNets fix the stem at 64 channels; only base_width=64 maps to torchvision.models."
                f"{resnet.group(2)}. Load it with ssl_lightning.backbones.build_backbone({backbone!r}, "
                f"base_width={width}) instead."
            )
        return ExportTarget("torchvision", resnet.group(2), cifar_stem=resnet.group(1) is not None)
    if backbone in _VITS:
        dynamic = kwargs.pop("dynamic_img_size", _vit_dynamic_default())
        model_kwargs = {"num_classes": 0, "img_size": kwargs.pop("image_size", 224),
                        "patch_size": kwargs.pop("patch_size", 16), **kwargs}
        if dynamic:
            model_kwargs["dynamic_img_size"] = True
        return ExportTarget("timm", _VITS[backbone], model_kwargs, renames=(("model.", ""),))
    if backbone in _MAE_VITS:
        unknown = set(kwargs) - _MAE_KWARGS
        if unknown:
            raise ValueError(f"backbone {backbone!r}: unexpected backbone_kwargs {sorted(unknown)} for export")
        pool = kwargs.pop("global_pool", "cls")
        model_kwargs = {"num_classes": 0, "img_size": kwargs.pop("image_size", 224),
                        "patch_size": kwargs.pop("patch_size", 16), **kwargs}
        model_kwargs.update({"global_pool": "token"} if pool == "cls" else {"global_pool": "avg", "fc_norm": False})
        size = backbone.removeprefix("mae_vit_")
        return ExportTarget("timm", f"vit_{size}_patch16_224", model_kwargs, renames=(("patch_embed.", "patch_embed.proj."),))
    if backbone in _CONVNEXTS:
        return ExportTarget("timm", backbone, {"num_classes": 0, **kwargs}, renames=(("model.", ""),))
    exportable = sorted({f"{prefix}{name}" for name in _RESNET_LAYOUTS for prefix in ("", "cifar_")} | set(_VITS)
                        | set(_MAE_VITS) | set(_CONVNEXTS))
    raise ValueError(f"backbone {backbone!r} has no torchvision/timm equivalent to export to; exportable: {', '.join(exportable)}")


def build_target(target: ExportTarget) -> nn.Module:
    """A fresh, randomly initialized instance of ``target`` (no download)."""
    if target.library == "torchvision":
        import torchvision

        model = getattr(torchvision.models, target.model)(weights=None, **target.model_kwargs)
        model.fc = nn.Identity()
        if target.cifar_stem:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model
    import timm

    return timm.create_model(target.model, pretrained=False, **target.model_kwargs)


def read_card(path: Union[str, Path]) -> dict[str, Any]:
    """The YAML front matter of a model card (``path`` is the card or the export folder)."""
    path = Path(path)
    card = path / CARD_FILE if path.is_dir() else path
    text = card.read_text()
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError(f"{card} has no YAML front matter (--- ... ---) with the export's backbone")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def build_exported_model(card_or_name: Union[str, Path], **backbone_kwargs: Any) -> nn.Module:
    """The torchvision/timm model (random weights) for an export folder, its card, or a backbone name.

    ``build_exported_model("runs/export")`` reads the card; ``build_exported_model("cifar_resnet18")`` or
    ``build_exported_model("vit_tiny", image_size=32, patch_size=4)`` take the backbone's own arguments.
    """
    if Path(card_or_name).exists():
        card = read_card(card_or_name)
        return build_target(export_target(card["backbone"], {**card.get("backbone_kwargs", {}), **backbone_kwargs}))
    return build_target(export_target(str(card_or_name), backbone_kwargs))


def load_exported_model(export_dir: Union[str, Path]) -> nn.Module:
    """The exported model with its weights (``strict=True``), in eval mode."""
    model = build_exported_model(export_dir)
    model.load_state_dict(torch.load(Path(export_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()


def exported_name(key: str, target: ExportTarget) -> str:
    """The name of our backbone's state-dict entry ``key`` in ``target``'s model (its first matching rename)."""
    for old, new in target.renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def exported_state_dict(backbone: nn.Module, target: ExportTarget) -> dict[str, torch.Tensor]:
    """``backbone``'s state dict with ``target``'s key names: CPU tensors only, a plain dict."""
    return {exported_name(key, target): value.detach().cpu().clone(memory_format=torch.contiguous_format)
            for key, value in backbone.state_dict().items()}


def check_round_trip(backbone: str, backbone_kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                     exported: Mapping[str, torch.Tensor], target: ExportTarget) -> float:
    """Max |feature difference| between our backbone and the exported model on 2 random images (eval mode).

    Loads ``exported`` with ``strict=True``; raises ``ValueError`` when the features differ.
    """
    ours = build_backbone(backbone, **backbone_kwargs)
    ours.load_state_dict(state)
    theirs = build_target(target)
    theirs.load_state_dict(exported, strict=True)
    size = target.model_kwargs.get("img_size", 32 if target.cifar_stem else 64)
    images = torch.randn(2, backbone_kwargs.get("in_chans", 3), size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.eval()(images), theirs.eval()(images)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        diff = (a - b).abs().max().item() if a.shape == b.shape else math.inf
        raise ValueError(f"exported {target.library} {target.model} gives other features than {backbone!r} "
                         f"(shapes {tuple(a.shape)} vs {tuple(b.shape)}, max diff {diff:.3g})")
    return (a - b).abs().max().item()


def load_snippet(target: ExportTarget) -> str:
    """Python lines that build the plain model and load ``backbone.pt`` (no ssl_lightning needed)."""
    if target.library == "torchvision":
        lines = ["import torch, torchvision",
                 f"model = torchvision.models.{target.model}(weights=None)",
                 "model.fc = torch.nn.Identity()  # features, no classifier"]
        if target.cifar_stem:
            lines += ["model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # CIFAR stem",
                      "model.maxpool = torch.nn.Identity()  # CIFAR stem"]
    else:
        args = ", ".join([repr(target.model), *(f"{k}={v!r}" for k, v in target.model_kwargs.items())])
        lines = ["import timm, torch", f"model = timm.create_model({args})"]
    return "\n".join([*lines, f'model.load_state_dict(torch.load("{WEIGHTS_FILE}", weights_only=True))', "model.eval()"])


def _flat(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    """Markdown rows: one per protocol (top-1/top-5) for the ``results`` of ``ssl-lightning eval``'s
    ``metrics.json``, else one per number of any nested dictionary."""
    results = metrics.get("results")
    if isinstance(results, Mapping) and results:
        rows = [f"| {name} | {_number(row.get('top1'))} | {_number(row.get('top5'))} |"
                for name, row in results.items() if isinstance(row, Mapping)]
        source = [f"Evaluated on {metrics['datamodule']} ({metrics.get('num_val', '?')} validation images)."] \
            if "datamodule" in metrics else []
        return [*source, "", "| protocol | top-1 (%) | top-5 (%) |", "|---|---:|---:|", *rows]
    numbers = {k: v for k, v in _flat(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numbers:
        return ["none given"]
    return ["| metric | value |", "|---|---:|", *(f"| {k} | {_number(v)} |" for k, v in numbers.items())]


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


def _known(value: Any) -> Any:
    return "unknown" if value is None else value


def model_card(meta: Mapping[str, Any], target: ExportTarget, max_diff: float) -> str:
    """The card: YAML front matter (machine-readable, read by ``build_exported_model``) and a short text."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["backbone_kwargs"].items())
    kwargs = f" ({kwargs})" if kwargs else ""
    training = [f"- method: `{meta['method']}`",
                f"- data: {meta.get('data') or 'not recorded (pass --data)'}",
                f"- epoch: {_known(meta.get('epoch'))} (Lightning's `current_epoch` when saved), "
                f"optimizer steps: {_known(meta.get('global_step'))}"]
    if meta.get("checkpoint"):
        training.append(f"- checkpoint: `{meta['checkpoint']}`")
    stem = " with the CIFAR stem (3x3 stride-1 conv1, no max-pool)" if target.cifar_stem else ""
    lines = [
        "---", yaml.safe_dump(dict(meta), sort_keys=False).rstrip(), "---", "",
        f"# {meta['method'].rsplit('.', 1)[-1]} backbone `{meta['backbone']}`", "",
        f"Self-supervised backbone `{meta['backbone']}`{kwargs} trained with ssl-lightning, exported as a plain "
        f"state dict (`{WEIGHTS_FILE}`) for `{target.library}` `{target.model}`{stem}. The model returns pooled "
        f"features of size {meta['feature_dim']} (no classifier); feed images normalized as in training. "
        f"Checked at export: same features as the backbone (max difference {max_diff:.1e}).", "",
        "## Training", "", *training, "",
        "## Metrics", "", *metrics_table(meta.get("metrics") or {}), "",
        "## Load it", "", "```python", load_snippet(target), "```", "",
        "or, with ssl-lightning installed: `ssl_lightning.eval.export.load_exported_model(\"<this folder>\")`.", "",
    ]
    if meta.get("note"):
        lines += ["## Note", "", meta["note"], ""]
    return "\n".join(lines)


def export_backbone(
    method: nn.Module,
    out_dir: Union[str, Path],
    metrics: Optional[Mapping[str, Any]] = None,
    data: Optional[str] = None,
    epoch: Optional[int] = None,
    global_step: Optional[int] = None,
    checkpoint: Optional[str] = None,
) -> Path:
    """Write ``backbone.pt`` (plain state dict for the torchvision/timm model) and ``model_card.md``.

    ``method`` is a trained ``SSLMethod`` (its ``hparams`` name the backbone). The export is loaded back into
    the plain model with ``strict=True`` and its features compared with the backbone's before anything is
    written. Returns ``out_dir``.
    """
    hparams = getattr(method, "hparams", {})
    if "backbone" not in hparams:
        raise ValueError(f"{type(method).__name__} has no image backbone from ssl_lightning.backbones to export")
    backbone, backbone_kwargs = hparams["backbone"], dict(hparams.get("backbone_kwargs") or {})
    target = export_target(backbone, backbone_kwargs)
    state = {k: v.detach().cpu() for k, v in method.backbone.state_dict().items()}
    exported = exported_state_dict(method.backbone, target)
    max_diff = check_round_trip(backbone, backbone_kwargs, state, exported, target)
    meta: dict[str, Any] = {
        "method": f"{type(method).__module__}.{type(method).__qualname__}",
        "backbone": backbone, "backbone_kwargs": backbone_kwargs, "feature_dim": int(method.backbone.feature_dim),
        "library": target.library, "model": target.model, "model_kwargs": target.model_kwargs,
        "cifar_stem": target.cifar_stem, "data": data, "epoch": epoch, "global_step": global_step,
        "checkpoint": checkpoint, "metrics": json.loads(json.dumps(dict(metrics or {}))),
    }
    if isinstance(method, SSLMethod) and type(method).forward is not SSLMethod.forward:
        meta["note"] = (f"{type(method).__name__}.forward prepares the images before the backbone; the export is the "
                        "backbone alone, so prepare inputs the same way to get the method's features.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(exported, out / WEIGHTS_FILE)
    (out / CARD_FILE).write_text(model_card(meta, target, max_diff))
    return out


def _progress(checkpoint: Path, weights_only: bool) -> tuple[Optional[int], Optional[int]]:
    """The epoch and optimizer step a Lightning checkpoint was saved at (the weights are not read: mmap)."""
    state = load_checkpoint_safely(checkpoint, weights_only)
    return state.get("epoch"), state.get("global_step")


def check_metrics_checkpoint(metrics: Mapping[str, Any], metrics_file: str, checkpoint: Path) -> None:
    """Refuse metrics of another checkpoint: ``ssl-lightning eval``'s ``metrics.json`` records the SHA-256 of the
    checkpoint it evaluated (``checkpoint_sha256``); a JSON file without it is taken as given. Metrics of the
    untrained network (``random_init: true``) are refused too: they do not describe the exported weights."""
    if metrics.get("random_init"):
        raise ValueError(f"--metrics {metrics_file} scores the untrained network (random_init: true), "
                         "not the checkpoint's weights")
    recorded = metrics.get("checkpoint_sha256")
    if recorded is None:
        return
    actual = file_sha256(checkpoint)
    if recorded != actual:
        raise ValueError(f"--metrics {metrics_file} is of another checkpoint: it records checkpoint_sha256 {recorded}, "
                         f"but {checkpoint} has SHA-256 {actual}")


def _data_from_config(checkpoint: Path) -> Optional[str]:
    """The datamodule of the run, from the ``config.yaml`` LightningCLI saves beside ``checkpoints/``."""
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    data = (yaml.safe_load(config.read_text()) or {}).get("data")
    if not isinstance(data, Mapping) or "class_path" not in data:
        return None
    args = {k: v for k, v in (data.get("init_args") or {}).items() if isinstance(v, (str, int, float, bool))}
    return f"`{data['class_path']}` {json.dumps(args)} (from {config})"


def export_checkpoint(checkpoint: Union[str, Path], output_dir: Union[str, Path], metrics_file: Optional[str] = None,
                      data: Optional[str] = None, weights_only: bool = True) -> Path:
    """``export_backbone`` of the method in a checkpoint of ``ssl-lightning fit``, with the card's epoch, step,
    data (``data``, else the run's ``config.yaml``) and metrics (a JSON file, e.g. ``ssl-lightning eval``'s)."""
    metrics = None
    if metrics_file:
        try:
            metrics = json.loads(Path(metrics_file).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--metrics {metrics_file}: not a readable JSON file ({err})") from err
        if not isinstance(metrics, dict):
            raise ValueError(f"--metrics {metrics_file}: expected a JSON object of metrics, got {type(metrics).__name__}")
    checkpoint = Path(checkpoint)
    method = load_method(checkpoint, weights_only=weights_only)
    if metrics is not None:
        check_metrics_checkpoint(metrics, str(metrics_file), checkpoint)
    epoch, global_step = _progress(checkpoint, weights_only)
    return export_backbone(method, output_dir, metrics=metrics, data=data or _data_from_config(checkpoint),
                           epoch=epoch, global_step=global_step, checkpoint=str(checkpoint))


def main(args: Optional[list[str]] = None) -> Path:
    """``ssl-lightning export --checkpoint X --output_dir Y [--metrics metrics.json] [--data TEXT]``.

    Errors are raised; ``ssl-lightning`` (``ssl_lightning.cli.main``) turns them into one line."""
    parser = argparse.ArgumentParser(
        prog="ssl-lightning export",
        description="Write a checkpoint's backbone as a plain torchvision/timm state dict with a model card.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--output_dir", required=True, help=f"where {WEIGHTS_FILE} and {CARD_FILE} go")
    parser.add_argument("--metrics", help="a JSON file of metrics for the card (e.g. metrics.json of `ssl-lightning eval`)")
    parser.add_argument("--data", help="what the backbone was trained on (default: the run's config.yaml data section)")
    parser.add_argument("--unsafe_load", action="store_true", help="load a trusted checkpoint with weights_only=False")
    ns = parser.parse_args(args)
    out = export_checkpoint(ns.checkpoint, ns.output_dir, ns.metrics, ns.data, weights_only=not ns.unsafe_load)
    print(f"exported {out / WEIGHTS_FILE} and {out / CARD_FILE}")
    return out
