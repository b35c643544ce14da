"""A generated long-sequence task and a Transformer encoder classifier (for RandMultiHeadAttention).

Each sequence holds ``length`` random tokens from a vocabulary of 16; the label
says whether marker token 1 occurs more often than marker token 2. The model
needs to aggregate over the whole sequence (no downloads, deterministic data).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MajorityDataModule", "TransformerClassifier"]

VOCAB = 16


def make_majority(n: int, length: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (n, length), generator=g)
    # markers: a few percent of positions, with a per-sequence bias so that both classes occur
    bias = torch.rand(n, 1, generator=g) * 0.04
    draw = torch.rand(n, length, generator=g)
    tokens[draw < 0.03 + bias] = 1
    tokens[(draw >= 0.03 + bias) & (draw < 0.03 + bias + 0.05)] = 2
    labels = ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()
    return TensorDataset(tokens, labels)


class MajorityDataModule(LightningDataModule):
    """Train/validation splits of the majority task; predict batches for timing."""

    def __init__(
        self, length: int = 1024, train_size: int = 2048, val_size: int = 256, batch_size: int = 16
    ) -> None:
        super().__init__()
        self.length = length
        self.train_size = train_size
        self.val_size = val_size
        self.batch_size = batch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set = make_majority(self.train_size, self.length, seed=0)
            self.val_set = make_majority(self.val_size, self.length, seed=1)

    def train_dataloader(self) -> DataLoader[Any]:
        assert self.train_set is not None
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )

    def val_dataloader(self) -> DataLoader[Any]:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=64)

    def predict_dataloader(self) -> DataLoader[Any]:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=16)


class TransformerClassifier(LightningModule):
    """Embedding + ``nn.TransformerEncoder`` (batch-first) + mean pooling + linear head.

    Args:
        d_model: model width.
        nhead: attention heads.
        layers: encoder layers.
        dim_feedforward: width of the feed-forward blocks.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        d_model: int = 64,
        nhead: int = 4,
        layers: int = 2,
        dim_feedforward: int = 128,
        lr: float = 2e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 2)
        self.lr = lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens))
        out: torch.Tensor = self.head(hidden.mean(1))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        loss = F.cross_entropy(self(tokens), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        tokens, labels = batch
        logits = self(tokens)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log("val_acc", accuracy, prog_bar=True)
        return {"val_acc": accuracy}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
