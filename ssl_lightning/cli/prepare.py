"""``ssl-lightning prepare``: an image folder as LitData chunks, for ``StreamingImages``."""

from __future__ import annotations

import argparse
from typing import Optional


def main(args: Optional[list[str]] = None) -> int:
    """``ssl-lightning prepare --input FOLDER --output DIR [--num-workers N] [--chunk-bytes 64MB] [--seed 0]``.

    Errors are raised; ``ssl-lightning`` (``ssl_lightning.cli.main``) turns them into one line."""
    parser = argparse.ArgumentParser(
        prog="ssl-lightning prepare",
        description="Write an image folder (<class>/*.jpg, or loose images) as LitData chunks: each file's bytes "
        "as they are, its class index, and the class names in ssl_lightning.json.",
    )
    parser.add_argument("--input", required=True, help="one split of an image folder, e.g. /data/imagenet/train")
    parser.add_argument("--output", required=True, help="a new or empty local folder")
    parser.add_argument("--num-workers", type=int, default=1, help="processes that check and write the images")
    parser.add_argument("--chunk-bytes", default="64MB", help="the size of a chunk (LitData's size string)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order the images are written in")
    ns = parser.parse_args(args)
    from ssl_lightning.datamodules.prepared import prepare_folder

    count = prepare_folder(ns.input, ns.output, ns.num_workers, ns.chunk_bytes, ns.seed)
    print(f"prepared {count} images from {ns.input} in {ns.output}")
    return count
