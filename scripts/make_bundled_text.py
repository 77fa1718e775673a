"""Cut the bundled text corpus from a Project Gutenberg plain-text eBook.

Usage: python scripts/make_bundled_text.py ../shared/data/text/pride_and_prejudice.txt \
    ssl_lightning/datamodules/assets/pride_and_prejudice.txt

Keeps only the text between the ``*** START OF ...`` and ``*** END OF ...`` markers (the Project Gutenberg
header and licence are dropped), converts CRLF to LF and strips trailing spaces, and writes UTF-8. The
source copy of eBook #1342 is Windows-1252 encoded (curly quotes as bytes 0x91-0x94): ``--encoding``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

START, END = "*** START OF THE PROJECT GUTENBERG EBOOK", "*** END OF THE PROJECT GUTENBERG EBOOK"


def gutenberg_body(raw: str, source: Path) -> str:
    """The lines strictly between the START and END marker lines of ``raw``."""
    if START not in raw or END not in raw:
        raise ValueError(f"{source}: no Project Gutenberg START/END markers")
    start = raw.index("\n", raw.index(START)) + 1
    body = raw[start : raw.index(END)]
    return "\n".join(line.rstrip() for line in body.splitlines()).strip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--encoding", default="cp1252", help="encoding of the source file")
    args = parser.parse_args()
    text = gutenberg_body(args.source.read_bytes().decode(args.encoding), args.source)
    args.target.write_text(text, encoding="utf-8")
    print(f"{args.target}: {len(text):,} characters")


if __name__ == "__main__":
    main()
