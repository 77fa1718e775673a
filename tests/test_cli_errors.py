"""Bad input ends ``ssl-lightning`` with one line naming the file, key or value at fault, and a non-zero exit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ssl_lightning.cli import main
from ssl_lightning.cli.run_folder import RUN_DIR_ENV
from tests.cli_utils import CONFIGS, TINY_SIMCLR, run_command
from tests.test_datamodules import make_image_folder

IMAGE_FOLDER = [f"--config={CONFIGS / 'simclr_bundled.yaml'}", "--trainer.accelerator=cpu", "--trainer.max_steps=1",
                "--trainer.limit_val_batches=0", "--model.init_args.backbone_kwargs={base_width: 4}", "--data=ImageFolder",
                "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.views.size=16"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.delenv("SSL_LIGHTNING_DEBUG", raising=False)


def failure(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """The exit code and the single error line of ``ssl-lightning ARGS`` run in this process."""
    with pytest.raises(SystemExit) as stopped:
        main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return stopped.value.code, lines[0]


def test_missing_data_path(capsys) -> None:
    code, line = failure(["fit", *IMAGE_FOLDER, "--data.init_args.root=/no/such/folder"], capsys)
    assert code == 1 and "/no/such/folder" in line


def test_empty_class_folder(tmp_path: Path, capsys) -> None:
    root = make_image_folder(tmp_path / "images", per_class=2)
    (root / "train" / "empty").mkdir()
    code, line = failure(["fit", *IMAGE_FOLDER, f"--data.init_args.root={root}"], capsys)
    assert code == 1 and "empty class folder" in line and str(root / "train" / "empty") in line


def test_unreadable_images_are_listed_together_before_training(tmp_path: Path, capsys) -> None:
    root = make_image_folder(tmp_path / "images", per_class=2)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    (root / "train" / "dog" / "cut.jpg").write_bytes(b"\xff\xd8\xff")
    code, line = failure(["fit", *IMAGE_FOLDER, f"--data.init_args.root={root}", "--data.init_args.verify_images=true"],
                         capsys)
    assert code == 1 and "2 unreadable" in line and "broken.png" in line and "cut.jpg" in line


def test_unknown_backbone_lists_the_known_ones(capsys) -> None:
    code, line = failure(["fit", *TINY_SIMCLR, "--trainer.max_steps=1", "--model.init_args.backbone=resnet19"], capsys)
    assert code == 1 and "unknown backbone 'resnet19'" in line and "resnet18" in line


def test_mistyped_and_abbreviated_options_are_refused_with_the_closest_names(capsys) -> None:
    code, line = failure(["fit", *TINY_SIMCLR, "--trainer.max_epoch=1"], capsys)
    assert code == 2 and "--trainer.max_epoch" in line and "did you mean --trainer.max_epochs" in line
    code, line = failure(["fit", *TINY_SIMCLR, "--model.init_args.temprature=0.1"], capsys)
    assert code == 2 and "temprature" in line and "did you mean temperature" in line
    code, line = failure(["fit", *TINY_SIMCLR, "--model=SimCLRR"], capsys)
    assert code == 2 and "'SimCLRR'" in line and "did you mean SimCLR" in line
    code, line = failure(["fit", *TINY_SIMCLR, "--trainer.max_epochs=ten"], capsys)
    assert code == 2 and "trainer.max_epochs" in line and "ten" in line


def test_garbage_and_foreign_checkpoints_give_one_line_without_unsafe_advice(tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "payload": Path("x")}, foreign)  # a class safe loading refuses
    for command in (["fit", *TINY_SIMCLR], ["eval", f"--config={CONFIGS / 'eval' / 'bundled.yaml'}"],
                    ["export", "--output_dir", str(tmp_path / "out")]):
        for bad in (garbage, foreign):
            option = "--ckpt_path" if command[0] == "fit" else "--checkpoint"
            code, line = failure([*command, f"{option}={bad}"], capsys)
            assert code != 0 and str(bad) in line, (command[0], line)
            assert "weights_only=False" not in line and "unsafe" not in line.lower(), line


def test_debug_switch_shows_the_traceback(capsys) -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        main(["fit", *TINY_SIMCLR, "--trainer.max_steps=1", "--model.init_args.backbone=resnet19", "--debug"])


def test_help_lists_commands_and_methods_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = run_command(["--help"], cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0
    for name in ("fit", "eval", "export", "SimCLR", "BYOL", "DINO", "MAE", "MaskedLanguageModel", "ImageFolder"):
        assert name in result.stdout, name
    assert elapsed < 3, f"ssl-lightning --help took {elapsed:.1f} s"


def test_a_failing_console_command_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    result = run_command(["fit", *TINY_SIMCLR, "--trainer.max_epoch=1"], cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1 and "--trainer.max_epochs" in errors[0], result.stderr
