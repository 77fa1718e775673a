"""Checkpoint loading for ``eval``/``export`` (and the fit CLI's ``--ckpt_path`` checks): one clear line per bad file,
never advising to turn safe loading off."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

from ssl_lightning.eval.checkpoint import load_checkpoint_safely, load_method, training_normalization
from ssl_lightning.eval.cache import file_sha256
from ssl_lightning.eval.export import export_checkpoint
from ssl_lightning.cli import main
from ssl_lightning.methods import SimCLR


class NotAllowed:
    """A pickled object that safe (``weights_only``) loading refuses."""


def one_line_error(call, *args) -> str:
    with pytest.raises(ValueError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message and "unsafe" not in message.lower()
    return message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint_safely(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("content", [b"\x00garbage" * 10, bytes(range(256)) * 4, b"epoch: 3\nlr: 0.1\n" * 5])
def test_random_bytes_and_text_are_not_checkpoints(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    message = one_line_error(load_checkpoint_safely, path)
    assert message.startswith(f"{path} is not a Lightning checkpoint: not a torch.save archive (it begins with ")
    assert repr(content[:16]) in message


def test_a_damaged_archive_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "damaged.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[:60] + bytes(200) + data[260:])  # the pickle zeroed, the zip directory intact
    assert zipfile.is_zipfile(path)
    message = one_line_error(load_checkpoint_safely, path)
    assert message == f"{path} is not a Lightning checkpoint: its pickled contents cannot be read safely"
    path.write_bytes(data[: len(data) // 2])  # cut short: no zip directory
    assert one_line_error(load_checkpoint_safely, path).startswith(f"{path} is not a Lightning checkpoint: not a torch.save")


def test_a_class_safe_loading_refuses_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "extra": NotAllowed()}, path)
    message = one_line_error(load_checkpoint_safely, path)
    assert message == (f"{path} holds class {__name__}.NotAllowed that safe loading does not allow "
                       "(a Lightning checkpoint of ssl-lightning holds only tensors and plain values)")
    assert one_line_error(load_method, path) == message
    with pytest.raises(SystemExit) as info:  # the export command prints that one line and exits non-zero
        main(["export", "--checkpoint", str(path), "--output_dir", str(tmp_path / "out")])
    assert info.value.code == 1 and f"ssl-lightning export: error: {message}" in capsys.readouterr().err
    assert load_checkpoint_safely(path, weights_only=False)["extra"].__class__ is NotAllowed  # trusted files only


@pytest.mark.parametrize("obj, what", [([1, 2], "it holds a list, not a dict with a 'state_dict'"),
                                       ({"weights": torch.zeros(2)}, "a dict without a 'state_dict' (keys: 'weights')")])
def test_other_torch_files_are_not_checkpoints(tmp_path: Path, obj, what: str) -> None:
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    assert one_line_error(load_checkpoint_safely, path) == f"{path} is not a Lightning checkpoint: {what}"


def test_foreign_checkpoints_name_what_is_missing(tmp_path: Path) -> None:
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, plain)
    assert "plain.ckpt has no hyper_parameters['_class_path']" in one_line_error(load_method, plain)
    text = tmp_path / "text.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "ssl_lightning.methods.MaskedLanguageModel"}}, text)
    assert "text.ckpt holds a ssl_lightning.methods.MaskedLanguageModel, not an image" in one_line_error(load_method, text)
    unknown = tmp_path / "unknown.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "ssl_lightning.methods.NoSuchMethod"}}, unknown)
    assert "cannot import the method class 'ssl_lightning.methods.NoSuchMethod'" in one_line_error(load_method, unknown)
    wrong = tmp_path / "wrong_weights.ckpt"
    hparams = {"_class_path": "ssl_lightning.methods.SimCLR", "backbone": "cifar_resnet18",
               "backbone_kwargs": {"base_width": 4}}
    torch.save({"state_dict": {"backbone.nonsense": torch.zeros(1)}, "hyper_parameters": hparams,
                "pytorch-lightning_version": "2.6.6"}, wrong)
    assert one_line_error(load_method, wrong).startswith(f"{wrong}: its weights or hyper-parameters do not fit SimCLR (")


def test_training_normalization_is_read_when_recorded() -> None:
    assert training_normalization({"state_dict": {}}) is None
    assert training_normalization({"datamodule_hyper_parameters": {"mean": [0.1, 0.2, 0.3]}}) is None
    recorded = {"datamodule_hyper_parameters": {"mean": (0.1, 0.2, 0.3), "std": [1, 2, 3]}}
    assert training_normalization(recorded) == {"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]}


def tiny_checkpoint(path: Path, seed: int) -> Path:
    """A checkpoint as ``ssl-lightning fit`` names its method (``_class_path``); width 64: exportable."""
    hparams = {"backbone": "cifar_resnet18", "backbone_kwargs": {"base_width": 64}, "projection_hidden_dim": 16,
               "projection_dim": 8}
    torch.manual_seed(seed)
    method = SimCLR(**hparams)
    torch.save({"state_dict": method.state_dict(), "hyper_parameters": {"_class_path": "ssl_lightning.methods.SimCLR",
                "_instantiator": "lightning.pytorch.cli.instantiate_module", **hparams}, "pytorch-lightning_version": "2.6.6", "epoch": 1, "global_step": 7}, path)
    return path


def test_export_refuses_metrics_of_another_checkpoint(tmp_path: Path) -> None:
    ours, other = tiny_checkpoint(tmp_path / "ours.ckpt", 0), tiny_checkpoint(tmp_path / "other.ckpt", 1)
    metrics_file = tmp_path / "metrics.json"
    metrics = {"checkpoint_sha256": file_sha256(other), "random_init": False, "results": {"linear": {"top1": 50.0}}}
    metrics_file.write_text(json.dumps(metrics))
    with pytest.raises(ValueError) as info:
        export_checkpoint(ours, tmp_path / "out", str(metrics_file))
    assert str(info.value) == (f"--metrics {metrics_file} is of another checkpoint: it records checkpoint_sha256 "
                               f"{hashlib.sha256(other.read_bytes()).hexdigest()}, but {ours} has SHA-256 "
                               f"{hashlib.sha256(ours.read_bytes()).hexdigest()}")
    assert not (tmp_path / "out").exists()
    export_checkpoint(other, tmp_path / "out", str(metrics_file))  # its own metrics are taken
    assert (tmp_path / "out" / "model_card.md").is_file()
    metrics_file.write_text(json.dumps({**metrics, "random_init": True}))
    with pytest.raises(ValueError, match="scores the untrained network"):
        export_checkpoint(other, tmp_path / "out2", str(metrics_file))
    metrics_file.write_text(json.dumps({"knn_top1": 40.0}))  # metrics of unknown origin: taken as given
    export_checkpoint(ours, tmp_path / "out3", str(metrics_file))
