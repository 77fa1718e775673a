"""Plain-text corpora for masked language modelling (Devlin et al. 2019, BERT).

Files are read as UTF-8, tokenized (a byte-level BPE trained on the corpus and cached, or the user's
``tokenizer.json``), concatenated with ``[SEP]`` between files and packed into sequences
``[CLS] t_1 ... t_{L-2} [SEP]``; the last one is padded (attention mask 0 on padding). The last
``val_fraction`` of the sequences is the validation split, masked once with a fixed seed; training batches
are masked anew at every step on the device (dynamic masking, as RoBERTa), with BERT's 15% / 80-10-10 rule.

Batches: ``{"input_ids": (B, L) long, "attention_mask": (B, L) bool, "labels": (B, L) long}``, labels -100
where no prediction is asked.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from ssl_lightning.datamodules.base import EpochShuffleSampler, ResumableLoader
from ssl_lightning.datamodules.tokenizer import SpecialIds, cached_tokenizer, load_tokenizer, special_ids
from ssl_lightning.transforms.mlm import IGNORE_INDEX, mask_tokens

BUNDLED_TEXT = "pride_and_prejudice.txt"
VAL_MASK_SEED = 0


def text_files(files: Union[str, list[str]]) -> list[Path]:
    """The files named by ``files``: a file, a folder (its ``*.txt`` files, recursively, sorted) or a list of both."""
    found: list[Path] = []
    for entry in [files] if isinstance(files, (str, os.PathLike)) else files:
        path = Path(entry).expanduser()
        if path.is_dir():
            in_folder = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not in_folder:
                raise FileNotFoundError(f"{path}: the folder holds no .txt files")
            found += in_folder
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"text file or folder not found: {path}")
    if not found:
        raise ValueError("no text files given (data.init_args.files is empty)")
    return found


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; errors name the file."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "convert it, e.g. iconv -f cp1252 -t utf-8") from err
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return text


def pack_sequences(token_ids: list[int], max_length: int, ids: SpecialIds) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``token_ids`` into ``[CLS] chunk [SEP]`` rows of ``max_length`` (the last padded with ``[PAD]``).
    Returns ``(input_ids (N, max_length) long, attention_mask (N, max_length) bool)``."""
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 ([CLS] token [SEP]), got {max_length}")
    chunk = max_length - 2
    rows, lengths = [], []
    for start in range(0, len(token_ids), chunk):
        row = [ids.cls, *token_ids[start : start + chunk], ids.sep]
        lengths.append(len(row))
        rows.append(row + [ids.pad] * (max_length - len(row)))
    input_ids = torch.tensor(rows, dtype=torch.long).view(-1, max_length)
    attention = torch.arange(max_length) < torch.tensor(lengths, dtype=torch.long).view(-1, 1)
    return input_ids, attention


class TokenSequences(Dataset):
    """Rows of packed token ids: ``{"input_ids", "attention_mask"}`` (and ``"labels"`` when given)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


class TextData(LightningDataModule):
    """Masked-language-modelling batches from plain-text files.

    Args:
        files: a text file, a folder (its ``*.txt`` files) or a list of them, UTF-8.
        tokenizer: a ``tokenizer.json`` to use; by default a byte-level BPE of ``vocab_size`` entries is
            trained on the files and cached in ``cache_dir``.
        vocab_size, lowercase: settings of the trained tokenizer.
        max_length: tokens per sequence, ``[CLS]`` and ``[SEP]`` included.
        val_fraction: share of the sequences (the last ones) held out for validation.
        mask_prob: share of the non-special tokens chosen for prediction.
        seed: seed of the training masks (default: the global seed), combined with the rank and step.

    After ``setup``, ``vocab_size`` is the tokenizer's (the model reads it) and ``special`` its special ids.
    """

    def __init__(
        self,
        files: Union[str, list[str]],
        tokenizer: Optional[str] = None,
        vocab_size: int = 8192,
        lowercase: bool = True,
        max_length: int = 128,
        val_fraction: float = 0.05,
        mask_prob: float = 0.15,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        cache_dir: str = "runs/tokenizers",
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size and eval_batch_size must be positive, got {batch_size} and {eval_batch_size}")
        self.files, self.tokenizer_file = files, tokenizer
        self.vocab_size, self.lowercase, self.max_length = vocab_size, lowercase, max_length
        self.val_fraction, self.mask_prob = val_fraction, mask_prob
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.cache_dir = cache_dir
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.special: Optional[SpecialIds] = None
        self.frequency_baseline: Optional[float] = None  # masked-token accuracy of the most frequent token
        self._replacement_ids: Optional[torch.Tensor] = None
        self._train: Optional[TokenSequences] = None
        self._val: Optional[TokenSequences] = None
        self._device_batches = 0  # training batches masked so far (saved for exact resume)
        self._train_loader: Optional[ResumableLoader] = None
        self._position: Optional[dict[str, int]] = None  # where a resumed run starts in the training order

    def _texts(self) -> tuple[list[Path], list[str]]:
        paths = text_files(self.files)
        return paths, [read_text_file(path) for path in paths]

    def tokenizer_path(self, texts: list[str]) -> Path:
        """The user's tokenizer file, or the one trained on ``texts`` (trained now if not cached)."""
        if self.tokenizer_file is not None:
            return Path(self.tokenizer_file).expanduser()
        return cached_tokenizer(texts, self.vocab_size, self.lowercase, self.cache_dir)

    def prepare_data(self) -> None:
        """Train and cache the tokenizer once (Lightning calls this on one process per node)."""
        self.tokenizer_path(self._texts()[1])

    def setup(self, stage: str) -> None:
        if self._train is not None:
            return
        paths, texts = self._texts()
        path = self.tokenizer_path(texts)
        tokenizer = load_tokenizer(path)
        self.special = special_ids(tokenizer, str(path))
        self.vocab_size = tokenizer.get_vocab_size()
        special = torch.tensor(self.special.special)
        all_ids = torch.arange(self.vocab_size)
        self._replacement_ids = all_ids[~torch.isin(all_ids, special)]
        stream: list[int] = []
        for i, encoding in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
            stream += encoding.ids + ([self.special.sep] if i < len(texts) - 1 else [])
        input_ids, attention = pack_sequences(stream, self.max_length, self.special)
        num_val = max(1, round(self.val_fraction * len(input_ids)))
        if len(input_ids) - num_val < 1:
            raise ValueError(f"{', '.join(map(str, paths))}: {len(stream)} tokens make {len(input_ids)} sequences "
                             f"of {self.max_length}, too few for a training and a validation split")
        self._train = TokenSequences(input_ids[:-num_val], attention[:-num_val])
        val_ids, val_attention = input_ids[-num_val:], attention[-num_val:]
        generator = torch.Generator().manual_seed(VAL_MASK_SEED)
        masked, labels = self._mask(val_ids, val_attention, generator)
        self._val = TokenSequences(masked, val_attention, labels)
        self._report(tokenizer, labels)

    def _mask(self, input_ids: torch.Tensor, attention: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        maskable = attention & ~torch.isin(input_ids, torch.tensor(self.special.special, device=input_ids.device))
        return mask_tokens(input_ids, maskable, self.special.mask, self._replacement_ids, generator, self.mask_prob)

    def _report(self, tokenizer: Any, val_labels: torch.Tensor) -> None:
        """Log the split sizes and the accuracy of always predicting the most frequent training token."""
        train = self._train.input_ids[self._train.attention_mask]
        train = train[~torch.isin(train, torch.tensor(self.special.special))]
        top = int(torch.bincount(train, minlength=self.vocab_size).argmax())
        chosen = val_labels[val_labels != IGNORE_INDEX]
        self.frequency_baseline = float((chosen == top).float().mean())
        rank_zero_info(
            f"{type(self).__name__}: {len(self._train)} training and {len(self._val)} validation sequences of "
            f"{self.max_length} tokens, vocabulary {self.vocab_size}; always predicting the most frequent token "
            f"{tokenizer.id_to_token(top)!r} gives a masked-token accuracy of {self.frequency_baseline:.3f}"
        )

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "call setup() first"
        if len(self._train) < self.batch_size:
            raise ValueError(f"{type(self).__name__}: batch_size={self.batch_size} is larger than the "
                             f"{len(self._train)} training sequences")
        # the order depends on (seed, epoch) only, split across ranks; a resumed epoch skips what was used
        position, self._position = self._position, None
        sampler = EpochShuffleSampler.of_rank(self.trainer, len(self._train), self.seed, position)
        self._train_loader = ResumableLoader(self._train, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                             num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        assert self._val is not None, "call setup() first"
        return DataLoader(self._val, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Mask training batches on their device, with a generator seeded from (seed, rank, batch count)."""
        if self.trainer is None or not self.trainer.training or "labels" in batch:
            return batch
        if self._train_loader is not None:
            self._train_loader.sampler.advance(batch["input_ids"].shape[0])
        generator = torch.Generator(device=batch["input_ids"].device)
        generator.manual_seed(hash((self.seed, self.trainer.global_rank, self._device_batches)) & 0x7FFF_FFFF_FFFF_FFFF)
        self._device_batches += 1
        masked, labels = self._mask(batch["input_ids"], batch["attention_mask"], generator)
        return {"input_ids": masked, "attention_mask": batch["attention_mask"], "labels": labels}

    def state_dict(self) -> dict[str, Any]:
        """The mask generator's batch count and the position in the training order."""
        position = self._position if self._train_loader is None else self._train_loader.state_dict()
        return {"device_batches": self._device_batches, "position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._device_batches = int(state_dict["device_batches"])
        self._position = state_dict.get("position")


class BundledText(TextData):
    """Jane Austen's *Pride and Prejudice* shipped with the package (see ``assets/README.md``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(files=str(resources.files(__package__).joinpath("assets", BUNDLED_TEXT)), **kwargs)
