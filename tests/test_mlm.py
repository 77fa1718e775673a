"""Masked language modelling (Devlin et al. 2019): BERT's masking rule, the tokenizer, the text data and
the loss, against slow obvious references."""

from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssl_lightning.datamodules import BundledText, TextData
from ssl_lightning.datamodules.text import BUNDLED_TEXT, pack_sequences, read_text_file, text_files
from ssl_lightning.datamodules.tokenizer import (
    SpecialIds,
    cached_tokenizer,
    load_tokenizer,
    special_ids,
    train_tokenizer,
)
from ssl_lightning.methods import MaskedLanguageModel
from ssl_lightning.transforms.mlm import IGNORE_INDEX, mask_tokens

MASK, PAD, CLS, SEP = 3, 0, 1, 2
CORPUS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.\n\n"
) * 20


def random_batch(rows: int = 512, length: int = 128, vocab: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids with [CLS] first, [SEP] inside and at the end, padding after a random length; and what is maskable."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    ids[:, 0] = CLS
    ids[:, length // 2] = SEP
    lengths = torch.randint(length // 2 + 2, length + 1, (rows,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        ids[r, n - 1] = SEP
        ids[r, n:] = PAD
    maskable = ids >= 4
    return ids, maskable


def test_masked_share_is_15_percent_and_split_80_10_10() -> None:
    ids, maskable = random_batch()
    masked, labels = mask_tokens(ids, maskable, MASK, torch.arange(4, 1000), torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.005
    to_mask = chosen & (masked == MASK)
    unchanged = chosen & (masked == ids)
    to_random = chosen & (masked != MASK) & (masked != ids)
    n = chosen.sum()
    assert abs(to_mask.sum() / n - 0.8) < 0.01
    assert abs(to_random.sum() / n - 0.1 * (1 - 1 / 996)) < 0.01
    assert abs(unchanged.sum() / n - 0.1) < 0.01


def test_each_row_gets_round_15_percent_of_its_maskable_tokens() -> None:
    ids, maskable = random_batch(rows=64)
    _, labels = mask_tokens(ids, maskable, MASK, torch.arange(4, 1000), torch.Generator().manual_seed(2))
    for r in range(64):
        available = int(maskable[r].sum())
        assert int((labels[r] != IGNORE_INDEX).sum()) == max(1, round(0.15 * available))


def test_special_and_padding_tokens_are_never_chosen_and_labels_are_minus_100_elsewhere() -> None:
    ids, maskable = random_batch(rows=256)
    for seed in range(5):
        masked, labels = mask_tokens(ids, maskable, MASK, torch.arange(4, 1000), torch.Generator().manual_seed(seed))
        for r in range(ids.shape[0]):
            for i in range(ids.shape[1]):
                if not maskable[r, i]:
                    assert labels[r, i] == IGNORE_INDEX and masked[r, i] == ids[r, i]
                elif labels[r, i] == IGNORE_INDEX:
                    assert masked[r, i] == ids[r, i]  # not chosen: untouched
                else:
                    assert labels[r, i] == ids[r, i]  # chosen: the label is the original token


def test_random_replacements_come_from_the_given_ids_and_masking_is_seeded() -> None:
    ids, maskable = random_batch(rows=128)
    replacements = torch.arange(500, 510)
    masked, labels = mask_tokens(ids, maskable, MASK, replacements, torch.Generator().manual_seed(3), mask_share=0.0,
                                 random_share=1.0)
    chosen = labels != IGNORE_INDEX
    assert torch.isin(masked[chosen], replacements).all()
    again = mask_tokens(ids, maskable, MASK, replacements, torch.Generator().manual_seed(3), mask_share=0.0,
                        random_share=1.0)
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


def test_a_row_without_maskable_tokens_gets_no_label() -> None:
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 7, SEP, PAD]])
    _, labels = mask_tokens(ids, ids >= 4, MASK, torch.arange(4, 10), torch.Generator().manual_seed(0))
    assert torch.equal(labels, torch.tensor([[-100] * 4, [-100, 7, -100, -100]]))


def test_tokenizer_round_trips_normalized_text() -> None:
    tokenizer = train_tokenizer([CORPUS], vocab_size=400)
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3]
    for text in ["It is a truth universally acknowledged.", "“Mr. Bennet,” said she — don’t!  Élan\n\nnew line",
                 "numbers 1234 and symbols #@%&*()"]:
        ids = tokenizer.encode(text).ids
        assert PAD not in ids and MASK not in ids
        expected = " ".join(text.split()).lower()
        assert tokenizer.decode(ids) == expected
    cased = train_tokenizer([CORPUS], vocab_size=400, lowercase=False)
    assert cased.decode(cased.encode("Mr. Darcy").ids) == "Mr. Darcy"


def test_tokenizer_cache_reuses_the_file_and_keys_on_settings(tmp_path: Path) -> None:
    first = cached_tokenizer([CORPUS], 300, True, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cached_tokenizer([CORPUS], 300, True, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert cached_tokenizer([CORPUS], 320, True, tmp_path) != first
    assert cached_tokenizer([CORPUS + "x"], 300, True, tmp_path) != first
    assert load_tokenizer(first).get_vocab_size() == 300


def test_bad_text_files_give_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="text file or folder not found: .*missing.txt"):
        text_files(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        read_text_file(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 \u201cquoted\u201d".encode("cp1252"))
    with pytest.raises(ValueError, match=r"latin.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_text_file(latin)
    folder = tmp_path / "no_text"
    folder.mkdir()
    (folder / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(FileNotFoundError, match="no_text: the folder holds no .txt files"):
        text_files(str(folder))
    data = TextData(files=[str(latin)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8"):
        data.setup("fit")


def test_bad_tokenizer_files_give_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a tokenizers JSON file"):
        load_tokenizer(broken)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=200, special_tokens=["[PAD]", "[CLS]", "[SEP]"]))
    with pytest.raises(ValueError, match=r"plain.json: the tokenizer has no mask token \(looked for \[MASK\] or <mask>\)"):
        special_ids(plain, "plain.json")


def test_pack_sequences_frames_and_pads() -> None:
    ids = SpecialIds(pad=PAD, cls=CLS, sep=SEP, mask=MASK, special=(0, 1, 2, 3))
    input_ids, attention = pack_sequences(list(range(10, 17)), 5, ids)  # 3 tokens per row
    assert input_ids.tolist() == [[1, 10, 11, 12, 2], [1, 13, 14, 15, 2], [1, 16, 2, 0, 0]]
    assert attention.tolist() == [[True] * 5, [True] * 5, [True, True, True, False, False]]


def test_text_data_batches_and_the_frequency_baseline(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(CORPUS)
    (corpus / "b.txt").write_text(CORPUS.upper())
    data = TextData(files=str(corpus), vocab_size=300, max_length=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    data.setup("fit")
    assert list((tmp_path / "cache").glob("tokenizer-300-*.json"))
    assert data.vocab_size == 300 and 0.0 < data.frequency_baseline < 0.5
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape[1] == 32 and batch["attention_mask"].dtype == torch.bool
    assert (batch["input_ids"][:, 0] == CLS).all()
    chosen = batch["labels"] != IGNORE_INDEX
    assert chosen.any() and not (chosen & ~batch["attention_mask"]).any()
    train = next(iter(data.train_dataloader()))
    assert set(train) == {"input_ids", "attention_mask"} and train["input_ids"].shape == (4, 32)


def test_bundled_corpus_is_the_novel_without_the_gutenberg_licence() -> None:
    text = resources.files("ssl_lightning.datamodules").joinpath("assets", BUNDLED_TEXT).read_text(encoding="utf-8")
    assert "It is a truth universally acknowledged" in text
    assert "PROJECT GUTENBERG" not in text.upper() and "\r" not in text
    assert 500_000 < len(text) < 800_000
    assert Path(BundledText(batch_size=4).files).name == BUNDLED_TEXT


def test_loss_is_cross_entropy_on_the_chosen_positions_only() -> None:
    torch.manual_seed(0)
    model = MaskedLanguageModel(vocab_size=50, dim=16, depth=1, num_heads=2, dropout=0.0).eval()
    ids, maskable = random_batch(rows=4, length=12, vocab=50)
    masked, labels = mask_tokens(ids, maskable, MASK, torch.arange(4, 50), torch.Generator().manual_seed(0))
    batch = {"input_ids": masked, "attention_mask": ids != PAD, "labels": labels}
    logits, targets = model._predictions(batch)
    loss = F.cross_entropy(logits, targets)
    with torch.no_grad():  # every position, then the reference mean over the chosen ones
        full = model.mlm_logits(model(masked, ids != PAD))
    total, count = 0.0, 0
    for r in range(4):
        for i in range(12):
            if labels[r, i] != IGNORE_INDEX:
                total += float(-torch.log_softmax(full[r, i], dim=-1)[labels[r, i]])
                count += 1
    assert count == int((labels != IGNORE_INDEX).sum()) and abs(loss.item() - total / count) < 1e-5
    other_padding = dict(batch, input_ids=masked.masked_fill(ids == PAD, 7))  # padding is kept out of attention
    assert torch.allclose(F.cross_entropy(*model._predictions(other_padding)), loss, atol=1e-5)


def test_fit_then_validate_from_the_checkpoint_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_lightning.cli import run_cli
    from tests.test_cli import CONFIGS, TINY, tiny_data_args, tiny_model_args

    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "mlm_text.yaml"
    args = [f"--config={config}", *tiny_model_args(config), *tiny_data_args(config, tmp_path)]
    fit = run_cli(["fit", *args, *TINY])
    vocab_size = fit.model.hparams.vocab_size
    assert vocab_size == 300 and fit.model.token_embed.num_embeddings == 300  # taken from the data at setup
    assert list((tmp_path / "runs" / "tokenizers").glob("tokenizer-300-*.json"))  # cached next to the runs
    checkpoint = fit.trainer.checkpoint_callback.last_model_path
    validate = run_cli(["validate", *args, f"--ckpt_path={checkpoint}", "--trainer.accelerator=cpu", "--trainer.devices=1"])
    metrics = validate.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/mlm_accuracy"]) <= 1.0
    assert torch.isclose(metrics["val/perplexity"], metrics["val/loss"].exp())
    for key, value in fit.model.state_dict().items():
        assert torch.equal(value, validate.model.state_dict()[key]), key


def _fit_tiny(root: Path, corpus: Path, max_steps: int, ckpt_path: str | None = None) -> MaskedLanguageModel:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0, verbose=False)
    data = TextData(files=str(corpus), vocab_size=300, max_length=16, batch_size=4, cache_dir=str(root.parent / "cache"))
    every_2_steps = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, logger=False, limit_val_batches=0, deterministic=True,
                      callbacks=[every_2_steps], enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    model = MaskedLanguageModel(dim=16, depth=1, num_heads=2, dropout=0.0)  # dropout draws from the global RNG
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def test_resume_mid_epoch_continues_exactly(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS[: len(CORPUS) // 4])
    full = _fit_tiny(tmp_path / "full", corpus, 6)
    resumed = _fit_tiny(tmp_path / "resumed", corpus, 6, ckpt_path=str(tmp_path / "full" / "step=2.ckpt"))
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
