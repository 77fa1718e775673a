"""Tokenizers for masked language modelling, from the ``tokenizers`` library.

``train_tokenizer`` learns a byte-level BPE (Sennrich et al. 2016; byte-level as RoBERTa, Liu et al. 2019)
on the corpus with BERT's special tokens; its normalizer applies NFKC, collapses every whitespace run to one
space and (optionally) lowercases, so ``decode(encode(text))`` gives back exactly the normalized text.
``cached_tokenizer`` keeps it in a folder next to the runs, under a name derived from the corpus and the
settings. A user's own ``tokenizer.json`` (WordPiece, BPE, ...) works too if it has pad/CLS/SEP/mask tokens.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
# accepted spellings of each role: BERT's, then RoBERTa's
_ROLE_NAMES = {"pad": ("[PAD]", "<pad>"), "cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}
_FORMAT = "bytebpe-v1"  # part of the cache key: change it when train_tokenizer changes


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens a text datamodule needs, and every special id (never masked nor drawn as a
    random replacement)."""

    pad: int
    cls: int
    sep: int
    mask: int
    special: tuple[int, ...]


def normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")]
    return normalizers.Sequence(steps + ([normalizers.Lowercase()] if lowercase else []))


def train_tokenizer(texts: Sequence[str], vocab_size: int, lowercase: bool = True) -> Tokenizer:
    """A byte-level BPE with at most ``vocab_size`` entries (special tokens first) learned on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer(lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer saved by ``tokenizers`` (``tokenizer.json``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path}: not a tokenizers JSON file ({err})") from err


def cached_tokenizer(
    texts: Sequence[str], vocab_size: int, lowercase: bool, cache_dir: str | os.PathLike
) -> Path:
    """The path of the tokenizer trained on ``texts`` with these settings, training and saving it first
    if ``cache_dir`` does not hold it yet (written to a temporary name, then renamed)."""
    digest = hashlib.sha256(f"{_FORMAT}|{vocab_size}|{lowercase}".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    path = Path(cache_dir) / f"tokenizer-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        train_tokenizer(texts, vocab_size, lowercase).save(str(partial))
        partial.replace(path)
    return path


def special_ids(tokenizer: Tokenizer, source: str) -> SpecialIds:
    """The special ids of ``tokenizer`` (loaded from ``source``, named in errors)."""
    ids = {}
    for role, names in _ROLE_NAMES.items():
        found = [tokenizer.token_to_id(name) for name in names if tokenizer.token_to_id(name) is not None]
        if not found:
            raise ValueError(f"{source}: the tokenizer has no {role} token (looked for {' or '.join(names)})")
        ids[role] = found[0]
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special} | set(ids.values())
    return SpecialIds(**ids, special=tuple(sorted(special)))
