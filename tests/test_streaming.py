"""LitData streaming: ``ssl-lightning prepare`` keeps every image's bytes and label, ``StreamingImages`` yields the
training batch contract, resumes mid-epoch exactly on 1 process and on 2 (gloo), and bad input is one line."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from litdata import StreamingDataLoader, StreamingDataset
from PIL import Image

from ssl_lightning.cli import main
from ssl_lightning.datamodules import StreamingImages
from ssl_lightning.datamodules.prepared import prepare_folder
from ssl_lightning.datamodules.streaming import StreamingLoader
from ssl_lightning.methods import SimCLR
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews

ROOT = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS = ("cat", "dog", "eel"), 8  # 24 images: 6 batches of 4 on one process, 3 per rank on two


def image_folder(root: Path) -> Path:
    """``root/<class>/<i>.jpg|png``: noise images of a few sizes, JPEG and PNG."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (20 + i, 24 + 2 * i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 3 == 0 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the image folder, its prepared copy in chunks of a few images)."""
    folder = image_folder(tmp_path_factory.mktemp("images") / "train")
    output = tmp_path_factory.mktemp("prepared") / "train"
    assert prepare_folder(str(folder), str(output), num_workers=2, chunk_bytes="8kb") == len(CLASSES) * PER_CLASS
    return folder, output


def items(location: Path) -> list[dict]:
    dataset = StreamingDataset(str(location))
    return [dataset[i] for i in range(len(dataset))]


def test_prepare_keeps_each_files_bytes_and_label_and_numbers_items_by_position(prepared) -> None:
    folder, output = prepared
    assert len(json.loads((output / "index.json").read_text())["chunks"]) > 4  # several chunks, two writers
    assert json.loads((output / "ssl_lightning.json").read_text())["classes"] == list(CLASSES)
    stored = items(output)
    assert [item["index"] for item in stored] == list(range(24))
    files = sorted((path.read_bytes(), CLASSES.index(path.parent.name)) for path in folder.rglob("*.*"))
    assert sorted((bytes(item["image"]), item["label"]) for item in stored) == files
    assert [item["label"] for item in stored] != sorted(item["label"] for item in stored)  # classes mixed in chunks


def test_datamodule_yields_the_batch_contract_every_item_once_per_epoch_and_labels_kept(prepared) -> None:
    _, output = prepared
    labels = [item["label"] for item in items(output)]
    data = StreamingImages(str(output), batch_size=4, num_workers=0, views=SimCLRViews(size=16), seed=1)
    data.setup("fit")
    assert (data.num_classes, data.classes, data.num_train_items) == (3, CLASSES, 24)
    image, label = data.train_eval_dataset()[5]["image"], data.train_eval_dataset()[5]["label"]
    assert image.shape == (3, 16, 16) and label == labels[5]
    loader = data.train_dataloader()
    epochs = [list(loader) for _ in range(2)]  # crops made in the loader (the rest of the views on the device)
    for batches in epochs:
        seen = torch.cat([batch["index"] for batch in batches]).tolist()
        assert sorted(seen) == list(range(24))
        for batch in batches:
            assert [labels[i] for i in batch["index"]] == batch["label"].tolist()
            assert len(batch["views"]) == len(batch["boxes"]) == 2 and batch["views"][0].shape == (4, 3, 16, 16)
    assert [b["index"].tolist() for b in epochs[0]] != [b["index"].tolist() for b in epochs[1]]  # reshuffled


def test_a_loaded_position_resumes_one_pass_only_where_litdata_would_replay_it_next_epoch(prepared) -> None:
    """Lightning ends an epoch at the loader's length without exhausting its iterator; LitData then keeps its resume
    flag and replays the loaded position in the next pass. ``StreamingLoader`` resumes only the first pass."""
    def epoch(loader, batches: int | None = None) -> list[list[int]]:
        return [b["index"].tolist() for b in itertools.islice(iter(loader), batches or len(loader))]

    data = StreamingImages(str(prepared[1]), batch_size=4, num_workers=0, views=SimCLRViews(size=16), seed=0)
    data.setup("fit")
    loader = data.train_dataloader()
    first, second = epoch(loader), epoch(loader)
    for loader_class, replays in ((StreamingLoader, False), (StreamingDataLoader, True)):
        interrupted = data.train_dataloader()
        assert epoch(interrupted, 2) == first[:2]
        resumed = data.train_dataloader()
        resumed.__class__ = loader_class  # StreamingDataLoader: LitData's own
        resumed.load_state_dict(interrupted.state_dict())
        assert epoch(resumed, len(resumed) - 2) == first[2:]
        assert epoch(resumed) == (first[2:] if replays else second)


class Seen(Callback):
    """The dataset indices of each training batch, in order."""

    def __init__(self) -> None:
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch["index"].tolist())


def fit(output: Path | str, root: Path, max_steps: int, ckpt_path: str | None = None, num_workers: int = 0,
        cache_dir: str | None = None) -> tuple[SimCLR, Seen, Trainer]:
    seed_everything(0)
    model = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
                   projection_dim=16, optim=OptimConfig(name="lars", lr=0.5, warmup_epochs=1))
    data = StreamingImages(str(output), batch_size=4, num_workers=num_workers, views=SimCLRViews(size=16), seed=0,
                           cache_dir=cache_dir)
    seen = Seen()
    every_2 = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, callbacks=[seen, every_2], logger=False,
                      default_root_dir=root, deterministic=True, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, seen, trainer


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory: pytest.TempPathFactory) -> tuple[SimCLR, Seen, Trainer, Path]:
    root = tmp_path_factory.mktemp("full")
    model, seen, trainer = fit(prepared[1], root, 16)
    return model, seen, trainer, root


@pytest.mark.parametrize("stop_step", [2, 6, 8], ids=["mid-epoch", "epoch-boundary", "mid-second-epoch"])
def test_one_process_resume_sees_the_same_batches_and_ends_bit_identical(prepared, uninterrupted, stop_step, tmp_path) -> None:
    full, full_seen, full_trainer, root = uninterrupted  # 6 batches an epoch; 16 steps end mid-epoch 2
    assert sorted(i for batch in full_seen.indices[:6] for i in batch) == list(range(24))
    checkpoint = torch.load(root / f"step={stop_step}.ckpt", weights_only=True)
    used = 4 * (stop_step % 6 or 6)  # items of this epoch trained on
    assert checkpoint["StreamingImages"]["position"]["num_samples_yielded"] == used
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["num_samples_yielded"] == used
    resumed, seen, trainer = fit(prepared[1], tmp_path, 16, ckpt_path=str(root / f"step={stop_step}.ckpt"))
    assert trainer.global_step == 16 and trainer.current_epoch == full_trainer.current_epoch
    assert seen.indices == full_seen.indices[stop_step:]
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_one_process_resume_with_two_workers(prepared, tmp_path) -> None:
    """LitData's replay of which worker yielded which batch (round robin), resumed mid-epoch."""
    _, full_seen, _ = fit(prepared[1], tmp_path / "full", 8, num_workers=2)
    _, seen, _ = fit(prepared[1], tmp_path / "resumed", 8, ckpt_path=str(tmp_path / "full" / "step=4.ckpt"), num_workers=2)
    assert seen.indices == full_seen.indices[4:]


SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from ssl_lightning.datamodules import StreamingImages
from ssl_lightning.methods import SimCLR
from ssl_lightning.optim import OptimConfig
from ssl_lightning.transforms import SimCLRViews

data_dir, out, num_workers = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Seen(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([batch["index"].tolist(), batch["label"].tolist()])


def fit(name, ckpt_path=None):
    seed_everything(0)
    model = SimCLR(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, projection_hidden_dim=32,
                   projection_dim=16, optim=OptimConfig(name="lars", lr=0.5, warmup_epochs=1))
    data = StreamingImages(data_dir, batch_size=4, num_workers=num_workers, views=SimCLRViews(size=16), seed=0)
    seen = Seen()
    every_2 = ModelCheckpoint(dirpath=f"{out}/{name}", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=7, limit_val_batches=0, logger=False,
                      callbacks=[seen, every_2], enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    torch.save({"model": model.state_dict(), "step": trainer.global_step, "epoch": trainer.current_epoch},
               f"{out}/{name}_rank{trainer.global_rank}.pt")
    with open(f"{out}/{name}_rank{trainer.global_rank}.json", "w") as f:
        json.dump(seen.batches, f)


fit("full")
print("RESUMING", flush=True)
fit("resumed", ckpt_path=f"{out}/full/step=2.ckpt")  # mid-epoch 0 (3 batches a rank); resumed into epoch 2
"""


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_process_ddp_every_item_once_an_epoch_and_mid_epoch_resume_is_exact(prepared, tmp_path, num_workers) -> None:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(script), str(prepared[1]), str(tmp_path), str(num_workers)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Restoring states from the checkpoint" in output and "not resumable" not in output
    labels = [item["label"] for item in items(prepared[1])]
    full = [json.loads((tmp_path / f"full_rank{rank}.json").read_text()) for rank in (0, 1)]
    first_epoch = [i for rank in full for indices, _ in rank[:3] for i in indices]
    assert sorted(first_epoch) == list(range(24))  # 3 batches of 4 a rank: each item once, on one rank
    for rank in (0, 1):
        assert all([labels[i] for i in indices] == batch_labels for indices, batch_labels in full[rank])
        resumed = json.loads((tmp_path / f"resumed_rank{rank}.json").read_text())
        assert resumed == full[rank][2:]
        a, b = (torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=True) for name in ("full", "resumed"))
        assert a["step"] == b["step"] == 7 and a["epoch"] == b["epoch"]
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), f"rank {rank}: {key}"


def test_bad_input_is_one_line_naming_it(prepared, tmp_path, monkeypatch) -> None:
    _, output = prepared
    broken = tmp_path / "broken"
    shutil.copytree(output, broken)
    chunks = sorted(broken.glob("chunk-*.bin"))
    cases = [
        (tmp_path / "nowhere", "LitData folder not found: .*nowhere"),
        (prepared[0], "not LitData output \\(no index.json\\)"),
    ]
    for path, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            StreamingImages(str(path))
    chunks[1].write_bytes(chunks[1].read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{chunks[1]}: corrupt chunk"):
        StreamingImages(str(broken))
    chunks[0].unlink()
    with pytest.raises(ValueError, match=f"{chunks[0]}: chunk missing"):
        StreamingImages(str(broken))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ValueError, match="s3://bucket/train: no AWS credentials found"):
        StreamingImages("s3://bucket/train")


def test_a_url_streams_through_litdatas_cache(prepared, tmp_path) -> None:
    """``local:<folder>`` is LitData's stand-in for an object store: index, metadata and chunks are fetched."""
    data = StreamingImages(f"local:{prepared[1]}", cache_dir=str(tmp_path / "cache"), batch_size=4, num_workers=0,
                           views=SimCLRViews(size=16))
    data.setup("fit")
    assert data.classes == CLASSES and sorted(torch.cat([b["index"] for b in data.train_dataloader()]).tolist()) == list(range(24))


def test_prepare_command_refuses_a_non_empty_output_and_names_an_unreadable_image(prepared, tmp_path, capsys) -> None:
    folder = tmp_path / "images"
    shutil.copytree(prepared[0], folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--input", str(folder), "--output", str(prepared[1])])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().endswith(f"--output {prepared[1]}: not an empty folder; refusing to overwrite it (--debug shows the traceback)")
    (folder / "dog" / "3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit):
        main(["prepare", "--input", str(folder), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"{folder / 'dog' / '3.jpg'}: cannot be read as an image" in error
    main(["prepare", "--input", str(prepared[0]), "--output", str(tmp_path / "ok"), "--chunk-bytes", "8kb"])
    assert "24 images" in capsys.readouterr().out and len(items(tmp_path / "ok")) == 24


def test_the_streaming_overlay_turns_an_imagenet_recipe_into_streaming_images(prepared, tmp_path) -> None:
    from ssl_lightning.cli.lightning_cli import run_cli

    cli = run_cli(["fit", f"--config={ROOT / 'configs' / 'simclr_imagenet.yaml'}",
                   f"--config={ROOT / 'configs' / 'data' / 'streaming.yaml'}", f"--data.init_args.input_dir={prepared[1]}",
                   f"--data.init_args.val_dir={prepared[1]}", f"--runs_root={tmp_path / 'runs'}"], run=False)
    data = cli.datamodule
    assert isinstance(data, StreamingImages) and (data.batch_size, data.views.size, data.num_classes) == (64, 224, 3)
    data.setup("fit")
    assert len(data.val_dataset()) == len(data.train_eval_dataset()) == 24
