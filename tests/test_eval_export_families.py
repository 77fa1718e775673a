"""Checkpoints of every method family through ``ssl-lightning eval`` and ``export``.

One method per family is fitted for 2 steps by ``ssl-lightning fit`` (in process, tiny sizes): contrastive with a
queue (MoCo v2), momentum target (BYOL), multi-crop (DINO: center and teacher; SwAV: prototypes and queue),
masked (MAE: decoder), pretext (Rotation: head). Its checkpoint must give back the fitted method whole (every
parameter and buffer, its own class), ``eval`` must score the fitted method's own features, and ``export`` must
give a plain torchvision/timm model with the fitted backbone's features. The text model (MLM) is refused by both
commands with one line. SimCLR's path is in tests/test_export.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ssl_lightning.cli import main
from ssl_lightning.cli.lightning_cli import run_cli
from ssl_lightning.eval import command
from ssl_lightning.eval.checkpoint import load_method
from ssl_lightning.eval.export import load_exported_model, read_card

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA = ["--data=SyntheticData", "--data.init_args.num_samples=16", "--data.init_args.num_val_samples=12",
        "--data.init_args.num_classes=3", "--data.init_args.image_size=16", "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0", "--data.init_args.views.size=16"]
FIT = ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
       "--trainer.enable_model_summary=false"]
RESNET18 = ["--model.init_args.backbone=resnet18", "--model.init_args.backbone_kwargs={}"]  # base width 64: torchvision
VIT = ["--model.init_args.backbone=vit_tiny",  # timm's ViT at a tiny size exports as it is
       "--model.init_args.backbone_kwargs={image_size: 16, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}"]
MULTI_CROP = ["--data.init_args.views.num_local=2", "--data.init_args.views.local_size=8"]


@dataclass(frozen=True)
class Family:
    """A method's bundled config, the arguments that shrink it, and the state its checkpoint must carry."""

    config: str
    args: tuple[str, ...]
    state: tuple[str, ...]  # state-dict keys (or key prefixes) of what makes the family


FAMILIES = {
    "contrastive/MoCoV2": Family("moco_v2_bundled.yaml", (
        *RESNET18, "--model.init_args.projection_hidden_dim=32", "--model.init_args.projection_dim=16",
        "--model.init_args.queue_size=24"), ("queue", "queue_ptr", "key_backbone.", "key_projector.")),
    "momentum/BYOL": Family("byol_bundled.yaml", (
        *VIT, "--model.init_args.projection_hidden_dim=32", "--model.init_args.projection_dim=16",
        "--model.init_args.prediction_hidden_dim=32", "--model.init_args.base_momentum=0.9"),
        ("target_backbone.", "target_projector.")),
    "multi-crop/DINO": Family("dino_bundled.yaml", (
        *VIT, *MULTI_CROP, "--model.init_args.out_dim=32", "--model.init_args.hidden_dim=16",
        "--model.init_args.bottleneck_dim=8"), ("center", "teacher_backbone.", "teacher_head.")),
    "multi-crop/SwAV": Family("swav_bundled.yaml", (
        *VIT, *MULTI_CROP, "--model.init_args.projection_hidden_dim=32", "--model.init_args.projection_dim=16",
        "--model.init_args.num_prototypes=10", "--model.init_args.freeze_prototypes_steps=1",
        "--model.init_args.queue_length=16", "--model.init_args.queue_start_epoch=0"),
        ("prototypes.", "queue", "queue_ptr")),
    "masked/MAE": Family("mae_bundled.yaml", (
        "--model.init_args.backbone_kwargs={image_size: 16, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}",
        "--model.init_args.decoder_dim=16", "--model.init_args.decoder_depth=1", "--model.init_args.decoder_num_heads=2"),
        ("decoder.",)),
    "pretext/Rotation": Family("rotation_bundled.yaml", (*RESNET18, "--model.init_args.head_hidden_dim=16"), ("head.",)),
}


def fit(config: str, args: list[str], tmp_path: Path) -> tuple[Any, Path]:
    """``ssl-lightning fit`` for 2 steps in a tmp runs folder; the CLI (with the fitted model) and last.ckpt."""
    cli = run_cli(["fit", f"--config={CONFIGS / config}", f"--runs_root={tmp_path / 'runs'}", *FIT, *args])
    assert cli.trainer.global_step == 2
    return cli, next((tmp_path / "runs").rglob("last.ckpt"))


def assert_same_state(loaded: torch.nn.Module, fitted: torch.nn.Module, family_state: tuple[str, ...]) -> None:
    """Every parameter and buffer of the fitted method comes back from the checkpoint, bit for bit."""
    ours, theirs = loaded.state_dict(), fitted.state_dict()
    assert ours.keys() == theirs.keys()
    for name in family_state:
        assert any(key == name or key.startswith(name) for key in ours), f"the checkpoint has no {name!r}"
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), f"{key} differs after loading the checkpoint"


def spy_on_features(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.nn.Module, list[dict], torch.Tensor]]:
    """Record what ``ssl-lightning eval`` extracts: (the method it loaded, the batches, the features)."""
    calls: list[tuple[torch.nn.Module, list[dict], torch.Tensor]] = []
    extract = command.extract_features

    def recording(model: torch.nn.Module, loader: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(loader)
        features, labels = extract(model, batches, device)
        calls.append((model, batches, features))
        return features, labels

    monkeypatch.setattr(command, "extract_features", recording)
    return calls


@pytest.mark.parametrize("family", list(FAMILIES), ids=lambda name: name.split("/")[1])
def test_checkpoint_loads_in_eval_and_export(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = FAMILIES[family]
    monkeypatch.chdir(tmp_path)
    cli, checkpoint = fit(spec.config, [*DATA, "--model.init_args.channels_last=false", *spec.args], tmp_path)
    fitted = cli.model.eval()

    loaded = load_method(checkpoint)
    assert type(loaded) is type(fitted)
    assert_same_state(loaded, fitted, spec.state)

    calls = spy_on_features(monkeypatch)
    main(["eval", f"--checkpoint={checkpoint}", *DATA, "--output_dir=eval", "--cache_dir=cache", "--device=cpu",
          "--protocols=[knn]", "--knn.k=[3]"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["method"] == type(fitted).__name__ and metrics["num_val"] == 12
    assert 0.0 <= metrics["results"]["knn/k=3"]["top1"] <= 100.0
    assert [len(features) for _, _, features in calls] == [16, 12]  # the training and validation images
    with torch.no_grad():
        for model, batches, features in calls:
            assert type(model) is type(fitted)
            expected = torch.cat([fitted(batch["image"]) for batch in batches])
            torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)

    main(["export", f"--checkpoint={checkpoint}", "--output_dir=export"])
    assert read_card(tmp_path / "export")["method"].endswith(f".{type(fitted).__name__}")
    exported = load_exported_model(tmp_path / "export")
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(images), fitted.backbone.eval()(images), rtol=0, atol=1e-5)


def test_text_checkpoint_is_refused_by_eval_and_export_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """MLM trains; ``eval`` and ``export`` are image-only and say so in one line, exit code 1."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                      "must be in want of a wife.\n" * 20)
    text = [f"--data.init_args.files={corpus}", "--data.init_args.vocab_size=300", "--data.init_args.max_length=16",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--data.init_args.val_fraction=0.2",
            "--model.init_args.dim=16", "--model.init_args.depth=1", "--model.init_args.num_heads=2"]
    _, checkpoint = fit("mlm_text.yaml", text, tmp_path)
    capsys.readouterr()
    for command_args in (["eval", *DATA, "--protocols=[knn]"], ["export", "--output_dir=export"]):
        with pytest.raises(SystemExit) as stopped:
            main([command_args[0], f"--checkpoint={checkpoint}", *command_args[1:]])
        assert stopped.value.code == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"ssl-lightning {command_args[0]}: error: ")
        assert "MaskedLanguageModel" in lines[0] and "not an image method" in lines[0]
    assert not (tmp_path / "export").exists()
