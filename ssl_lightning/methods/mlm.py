"""Masked language modelling (Devlin, Chang, Lee, Toutanova 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding"): a transformer encoder reads a sequence in which
15% of the tokens were chosen (80% replaced by [MASK], 10% by a random token, 10% kept) and predicts the
original token at exactly those positions. The masking is the data's job (``TextData``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from ssl_lightning.methods.training_log import TrainingLog
from ssl_lightning.optim import OptimConfig, build_optimizer, fused_allowed, warmup_cosine, warmup_cosine_steps

IGNORE_INDEX = -100  # label of positions without a prediction (F.cross_entropy's ignore_index)


class MaskedLanguageModel(TrainingLog):
    """A BERT-style encoder: token + learned position embeddings followed by a LayerNorm (as BERT's
    embeddings: at init std 0.02 the token signal would otherwise be tiny next to the blocks' outputs),
    pre-norm ``nn.TransformerEncoder`` (Xiong et al. 2020) with a final LayerNorm, and BERT's MLM head
    (dense, GELU, LayerNorm, then the output projection tied to the token embedding, with its own bias).

    Args:
        vocab_size: size of the vocabulary; None takes ``trainer.datamodule.vocab_size`` at ``setup``
            (the tokenizer may be trained then) and stores it in the hyper-parameters for checkpoints.
        dim, depth, num_heads, mlp_ratio, dropout: the encoder's shape. In training, dropout draws from a
            random state seeded per step from (``PL_GLOBAL_SEED``, rank, step, micro-batch): ranks drop
            different units and a resumed run draws as an uninterrupted one.
        max_positions: the longest sequence the position embedding covers.
        optim: the optimizer recipe (default AdamW, lr 1e-4, weight decay 0.01, as BERT).

    Batches: ``{"input_ids", "attention_mask", "labels"}`` (labels -100 where nothing is predicted).
    Logs ``train/loss``, and on validation ``val/loss``, ``val/mlm_accuracy`` (top-1 on the chosen
    tokens) and ``val/perplexity`` (exp of the mean cross-entropy over all chosen validation tokens).
    """

    def __init__(
        self,
        vocab_size: Optional[int] = None,
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        max_positions: int = 512,
        optim: Optional[OptimConfig] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim = optim if optim is not None else OptimConfig(name="adamw", lr=1e-4, scale_lr="none", weight_decay=0.01)
        self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric()
        if vocab_size is not None:
            self._build(vocab_size)

    def _build(self, vocab_size: int) -> None:
        hp = self.hparams
        self.token_embed = nn.Embedding(vocab_size, hp.dim)
        self.pos_embed = nn.Embedding(hp.max_positions, hp.dim)
        self.embed_norm = nn.LayerNorm(hp.dim)
        self.embed_dropout = nn.Dropout(hp.dropout)
        layer = nn.TransformerEncoderLayer(
            hp.dim, hp.num_heads, int(hp.dim * hp.mlp_ratio), hp.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, hp.depth, norm=nn.LayerNorm(hp.dim), enable_nested_tensor=False)
        self.head_transform = nn.Sequential(nn.Linear(hp.dim, hp.dim), nn.GELU(), nn.LayerNorm(hp.dim))
        self.output_bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT's initialization: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)

    def setup(self, stage: str) -> None:
        if self.hparams.vocab_size is None:
            vocab_size = getattr(self.trainer.datamodule, "vocab_size", None)
            if vocab_size is None:
                raise ValueError("MaskedLanguageModel: set model.init_args.vocab_size or use a text datamodule with vocab_size")
            self.hparams.vocab_size = int(vocab_size)
            self._build(self.hparams.vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, dim) of token ids (B, L); ``attention_mask`` is True on real tokens."""
        length = input_ids.shape[1]
        if length > self.hparams.max_positions:
            raise ValueError(f"sequences of {length} tokens are longer than max_positions={self.hparams.max_positions}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed_dropout(self.embed_norm(self.token_embed(input_ids) + self.pos_embed(positions)))
        return self.encoder(x, src_key_padding_mask=~attention_mask.bool())

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states (..., dim) through the tied output projection."""
        return F.linear(self.head_transform(hidden), self.token_embed.weight, self.output_bias)

    def _predictions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at the chosen positions only (boolean indexing syncs with the host, and
        spares the vocabulary projection of the ~85% of positions without a prediction)."""
        hidden = self(batch["input_ids"], batch["attention_mask"])
        chosen = batch["labels"] != IGNORE_INDEX
        return self.mlm_logits(hidden[chosen]), batch["labels"][chosen]

    @contextmanager
    def _step_random_state(self, batch_idx: int) -> Iterator[None]:
        """The global random state (dropout's) seeded from (seed, rank, step, micro-batch), restored after."""
        if self.hparams.dropout == 0:
            yield
            return
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        key = (int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_rank, self.trainer.global_step, micro_batch)
        with torch.random.fork_rng(devices=[self.device] if self.device.type != "cpu" else [], device_type=self.device.type):
            torch.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
            yield

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with self._step_random_state(batch_idx):
            logits, targets = self._predictions(batch)
        loss = F.cross_entropy(logits, targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, targets = self._predictions(batch)
        self.val_loss.update(F.cross_entropy(logits, targets, reduction="none"))
        self.val_accuracy.update((logits.argmax(dim=-1) == targets).float())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # mean over every chosen token of every rank
        self.log_dict(
            {"val/loss": loss, "val/mlm_accuracy": self.val_accuracy.compute(), "val/perplexity": torch.exp(loss)},
            prog_bar=True,
        )
        self.val_loss.reset()
        self.val_accuracy.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("the learning-rate scaling needs the datamodule's batch_size")
        batch_size = per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches
        optimizer = build_optimizer(self.optim, [self], batch_size, fused=fused_allowed(self.trainer))
        warmup_steps, total_steps = warmup_cosine_steps(self.trainer, self.optim.warmup_epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, self.optim.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
