"""``ImageFolder(verify_images=True)`` lists every unreadable file in one error before training;
``skip_unreadable=True`` leaves them out and says how many and which."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_lightning.datamodules import ImageFolder
from ssl_lightning.datamodules.image_folder import unreadable_files
from ssl_lightning.transforms import SimCLRViews
from tests.ddp_utils import run_distributed

PER_CLASS = 3


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path) -> list[Path]:
    """Two classes of PER_CLASS good PNGs in train/ and val/, plus three corrupt files (returned, in path order):
    garbage behind a JPEG header, a truncated PNG (train) and an empty file (val)."""
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            for i in range(PER_CLASS):
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(png_bytes(i))
    corrupt = [root / "train" / "cat" / "broken.jpg", root / "train" / "dog" / "truncated.png", root / "val" / "dog" / "empty.png"]
    corrupt[0].write_bytes(b"\xff\xd8\xff\xe0garbage")
    corrupt[1].write_bytes(png_bytes(7)[:300])
    corrupt[2].write_bytes(b"")
    return corrupt


def datamodule(root: Path, **kwargs) -> ImageFolder:
    return ImageFolder(str(root), batch_size=2, num_workers=0, views_on_device=False, views=SimCLRViews(size=16), **kwargs)


def readable(path: Path) -> bool:
    """The slow obvious check: PIL opens and fully decodes the file."""
    try:
        with Image.open(path) as image:
            image.convert("RGB").load()
        return True
    except Exception:
        return False


def test_verify_lists_every_unreadable_file_in_one_error(tmp_path: Path) -> None:
    corrupt = make_folder(tmp_path)
    assert [p for p in sorted(tmp_path.rglob("*.*")) if not readable(p)] == sorted(corrupt)
    dm = datamodule(tmp_path, verify_images=True)
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert message.startswith(f"3 unreadable image file(s) under {tmp_path}")
    assert "skip_unreadable" in message
    for path in corrupt:
        assert re.search(rf"{re.escape(str(path))}: cannot be read as an image \(.+\)", message)
    assert message.count("cannot be read") == 3


def test_verify_passes_a_clean_folder_and_is_off_by_default(tmp_path: Path) -> None:
    corrupt = make_folder(tmp_path)
    datamodule(tmp_path).setup("fit")  # default: nothing decoded in setup, the corrupt files go unnoticed here
    for path in corrupt:
        path.unlink()
    dm = datamodule(tmp_path, verify_images=True)
    dm.setup("fit")
    assert dm.skipped_files == [] and len(dm.train_files) == 2 * PER_CLASS


def test_skip_unreadable_iterates_only_the_good_files_and_names_the_skipped(tmp_path: Path) -> None:
    corrupt = make_folder(tmp_path)
    dm = datamodule(tmp_path, skip_unreadable=True)
    with pytest.warns(UserWarning, match=r"skipping 3 unreadable image file\(s\)") as record:
        dm.setup("fit")
    warning = str(record[0].message)
    assert all(str(path) in warning for path in corrupt)
    assert dm.skipped_files == corrupt

    good_train = [p for p in sorted((tmp_path / "train").rglob("*.*")) if readable(p)]
    assert sorted(dm.train_files) == good_train
    assert [dm.classes[label] for label in dm.train_labels] == [p.parent.name for p in dm.train_files]
    assert sum(len(batch["label"]) for batch in dm.train_dataloader()) == len(good_train) // 2 * 2  # drop_last
    assert sum(len(batch["label"]) for batch in dm.val_dataloader()) == 2 * PER_CLASS


def _unreadable_on_rank(rank: int, world_size: int, paths: list[str]) -> list[str]:
    return [str(path) for path in unreadable_files([Path(p) for p in paths], threads=2)]


@pytest.mark.slow  # 2 spawned processes: 15-30 s on this machine
def test_ranks_share_the_work_and_all_get_every_failure(tmp_path: Path) -> None:
    corrupt = make_folder(tmp_path)
    paths = sorted(tmp_path.rglob("*.*"))
    found = run_distributed(_unreadable_on_rank, 2, [str(p) for p in paths])
    assert found == [str(p) for p in sorted(corrupt)]  # rank 0 decodes half the files and learns of all three
    assert list(unreadable_files(paths)) == sorted(corrupt)
