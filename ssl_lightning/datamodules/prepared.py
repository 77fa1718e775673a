"""Image folders as LitData chunks: ``ssl-lightning prepare`` writes them, ``StreamingImages`` reads them.

A prepared folder holds LitData's ``index.json`` and ``chunk-*.bin`` files, whose items are
``{"image": the file's encoded bytes (never re-encoded), "label": class index or -1, "index": position}`` in a
seeded random order, and ``ssl_lightning.json`` with the class names (sorted, as the image folder's labels).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from litdata import StreamingDataset, optimize
from litdata.streaming.downloader import get_downloader

from ssl_lightning.datamodules.image_folder import scan_folder, unreadable_files
from ssl_lightning.datamodules.object_store import S3Downloader

METADATA = "ssl_lightning.json"
INDEX = "index.json"
FORMAT = "ssl-lightning images 1"


def _item(entry: tuple[str, int, int]) -> dict[str, Any]:
    path, label, index = entry
    return {"image": Path(path).read_bytes(), "label": label, "index": index}


def prepare_folder(
    input_dir: str, output_dir: str, num_workers: int = 1, chunk_bytes: str = "64MB", seed: int = 0
) -> int:
    """Write the images of ``input_dir`` (``<class>/*.jpg``, or loose images without labels) as LitData chunks
    under ``output_dir`` (a new or empty local folder), in an order shuffled by ``seed``; every image is decoded
    once first. Returns the count.

    The order is shuffled because LitData shuffles chunks, and items within a chunk: a chunk of one class (the
    folder's order) would make batches of one class."""
    output = Path(output_dir)
    if is_url(output_dir):
        raise ValueError(f"--output {output_dir}: write to a local folder, then copy it to object storage")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output}: not an empty folder; refusing to overwrite it")
    paths, labels, classes = scan_folder(Path(input_dir))
    bad = unreadable_files(paths, num_workers)
    if bad:
        raise ValueError(f"{len(bad)} unreadable image file(s) under {input_dir}, first: {next(iter(bad.values()))}")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    entries = [(str(paths[i]), labels[i], index) for index, i in enumerate(order)]
    with _private_scratch():
        optimize(fn=_item, inputs=entries, output_dir=str(output.resolve()), chunk_bytes=chunk_bytes,
                 num_workers=max(1, num_workers), keep_data_ordered=True, reorder_files=False, verbose=False,
                 start_method="fork")
    (output / METADATA).write_text(json.dumps({"format": FORMAT, "classes": classes, "num_items": len(entries)}))
    return len(entries)


@contextlib.contextmanager
def _private_scratch() -> Iterator[None]:
    """Point ``optimize``'s scratch folders at a temporary folder of this call's own: by default it deletes and
    reuses ``$TMPDIR/chunks`` and ``$TMPDIR/data``, which another ``optimize`` running at the same time shares."""
    names = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="ssl_lightning_prepare_") as scratch:
        os.environ.update({name: os.path.join(scratch, name.lower()) for name in names})
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value


def is_url(location: str) -> bool:
    """An object-store URL (or LitData's ``local:`` cached copy of a folder) rather than a local folder."""
    return "://" in location or location.startswith("local:")


def check_credentials(url: str) -> None:
    """Fail with one line when an ``s3://`` URL has no credentials (environment, AWS config files or role)."""
    if url.startswith("s3://"):
        import boto3

        if boto3.Session().get_credentials() is None:
            raise ValueError(
                f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            )


def read_prepared(location: str, cache_dir: Optional[str] = None) -> dict[str, Any]:
    """The metadata of a prepared folder or URL, after checking it: a local folder must hold ``index.json``,
    ``ssl_lightning.json`` and every chunk ``index.json`` lists, each of the size it lists."""
    if is_url(location):
        check_credentials(location)
        return _read_remote_metadata(location, cache_dir)
    root = Path(location)
    if not root.is_dir():
        raise FileNotFoundError(f"LitData folder not found: {root}")
    if not (root / INDEX).is_file():
        raise ValueError(f"{root}: not LitData output (no {INDEX}); make it with `ssl-lightning prepare`")
    metadata = _metadata(root / METADATA, location)
    chunks = _read_json(root / INDEX).get("chunks", [])
    for chunk in chunks:
        path, size = root / chunk["filename"], chunk["chunk_bytes"]
        if not path.is_file():
            raise ValueError(f"{path}: chunk missing (listed in {root / INDEX})")
        if path.stat().st_size != size:
            raise ValueError(f"{path}: corrupt chunk ({path.stat().st_size} bytes, {INDEX} says {size})")
    listed = sum(chunk["chunk_size"] for chunk in chunks)
    if listed != metadata["num_items"]:
        raise ValueError(f"{root / INDEX}: lists {listed} items, {METADATA} {metadata['num_items']}")
    return metadata


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from err


def _metadata(path: Path, location: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{location}: LitData output without {METADATA}; make it with `ssl-lightning prepare`")
    metadata = _read_json(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    return metadata


def _read_remote_metadata(url: str, cache_dir: Optional[str]) -> dict[str, Any]:
    """Open ``url`` with LitData (which fetches its ``index.json`` into a local cache folder), fetch
    ``ssl_lightning.json`` beside it and read it. From S3 through boto3, as LitData fetches ``index.json``: its
    other path, obstore, would start a runtime in this process that keeps the loader's forked workers off obstore."""
    try:
        local = StreamingDataset(url, cache_dir=cache_dir).input_dir.path
        remote, target = f"{url.rstrip('/')}/{METADATA}", os.path.join(local, METADATA)
        downloader = get_downloader(url, local, [])
        if isinstance(downloader, S3Downloader):
            with open(target, "wb") as file:
                downloader.download_fileobj(remote, file)
        else:
            downloader.download_file(remote, target)
    except Exception as err:  # noqa: BLE001 - each object store raises its own types; the message names the URL
        reason = f"{type(err).__name__}: {err}"
        raise ValueError(f"{url}: not readable `ssl-lightning prepare` output ({reason})") from err
    return _metadata(Path(local) / METADATA, url)
