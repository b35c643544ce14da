"""transformers models built from small configs (nothing downloaded), on data that ships locally.

- :class:`DigitTokensDataModule` + :class:`BertDigitsClassifier`: scikit-learn's 8x8
  digits read as a 65-token sequence (``[CLS]`` then the 64 pixel intensities 0..16, row
  by row) and classified by ``BertForSequenceClassification(BertConfig(...))``.
  Split 60/20/20 into train / validation / test with a fixed seed.
- :class:`StdlibBytesDataModule` + :class:`GPT2ByteLM`: byte-level language modelling
  of the Python standard library's own source files (``Lib/*.py`` of the running
  interpreter) with ``GPT2LMHeadModel(GPT2Config(vocab_size=256, ...))``. Files, not
  windows, are split (every 10th file is validation, the next one test), so held-out
  text is code the model never saw. Which files exist depends on the Python version.

Both log ``val_*`` / ``test_*`` metrics and define ``predict_step`` (what tuning times).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from sketchtune.examples._steps import ClassifierSteps, warmup_adamw
from sketchtune.examples.digits import _load_digits

__all__ = ["BertDigitsClassifier", "DigitTokensDataModule", "GPT2ByteLM", "StdlibBytesDataModule"]

#: the ``[CLS]`` token id of the digit sequences (pixel intensities are 0..16)
CLS = 17


class DigitTokensDataModule(LightningDataModule):
    """The digits as token sequences: ``[CLS]`` + 64 intensities; 60/20/20 split (fixed seed).

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of the validation, test and predict dataloaders
            (the predict one is what tuning times: 16 x 65 tokens by default).
        seed: the split's seed.
    """

    def __init__(self, batch_size: int = 32, eval_batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.sets: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        if self.sets:
            return
        x, y = _load_digits()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        tokens = torch.cat([torch.full((len(x), 1), CLS), x[order].long()], dim=1)
        y = y[order]
        a, b = int(0.6 * len(x)), int(0.8 * len(x))
        self.sets = {
            "train": TensorDataset(tokens[:a], y[:a]),
            "val": TensorDataset(tokens[a:b], y[a:b]),
            "test": TensorDataset(tokens[b:], y[b:]),
        }

    def train_dataloader(self) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.sets["train"], batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["val"], batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["test"], batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["val"], batch_size=self.eval_batch_size)


class BertDigitsClassifier(ClassifierSteps):
    """``BertForSequenceClassification`` from a small ``BertConfig``, trained with AdamW.

    The transformers model is ``self.model`` (layers ``model.bert.encoder.layer.0.
    intermediate.dense`` and so on). Logs ``val_acc`` / ``test_acc`` and the losses.

    Args:
        hidden: hidden size; the feed-forward width is 4x.
        layers: encoder layers.
        heads: attention heads.
        lr: AdamW learning rate.
        warmup_steps: linear learning-rate warm-up at the start of training.
    """

    def __init__(
        self,
        hidden: int = 256,
        layers: int = 4,
        heads: int = 4,
        lr: float = 5e-4,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        self.save_hyperparameters()
        self.lr = lr
        self.warmup_steps = warmup_steps
        config = BertConfig(
            vocab_size=CLS + 1,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=65,
            type_vocab_size=1,
            id2label={i: str(i) for i in range(10)},
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        )
        self.model = BertForSequenceClassification(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=tokens).logits
        return logits

    def configure_optimizers(self) -> Any:
        return warmup_adamw(self, self.lr, self.warmup_steps)


def stdlib_sources() -> list[Path]:
    """The running interpreter's top-level standard-library modules (``Lib/*.py``), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:  # pragma: no cover - e.g. an interpreter shipped without sources
        raise FileNotFoundError(f"no standard-library sources (*.py) under {root}")
    return files


class StdlibBytesDataModule(LightningDataModule):
    """Bytes of the standard library's sources in blocks of ``block + 1`` (inputs and targets).

    Every 10th file (sorted by name) is validation, the file after it test, the rest
    training. Training draws random windows each epoch (``train_blocks`` of them);
    validation and test are the first ``eval_blocks`` non-overlapping windows of their files.

    Args:
        block: tokens per sequence (bytes).
        batch_size: training batch size.
        eval_batch_size: batch size of the validation, test and predict dataloaders
            (tuning times the predict one: 8 x 128 tokens by default).
        train_blocks: training windows per epoch.
        eval_blocks: validation (and test) windows.
        seed: seed of the training windows.
    """

    def __init__(
        self,
        block: int = 128,
        batch_size: int = 16,
        eval_batch_size: int = 8,
        train_blocks: int = 4096,
        eval_blocks: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.block = block
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_blocks = train_blocks
        self.eval_blocks = eval_blocks
        self.seed = seed
        self.streams: dict[str, torch.Tensor] = {}
        self.sets: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        if self.sets:
            return
        parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
        for i, path in enumerate(stdlib_sources()):
            split = "val" if i % 10 == 0 else "test" if i % 10 == 1 else "train"
            parts[split].append(path.read_bytes())
        for split, chunks in parts.items():
            data = bytearray(b"\n".join(chunks))
            self.streams[split] = torch.frombuffer(data, dtype=torch.uint8).long()
        n = self.block + 1
        generator = torch.Generator().manual_seed(self.seed)
        train = self.streams["train"]
        starts = torch.randint(0, len(train) - n, (self.train_blocks,), generator=generator)
        self.sets["train"] = TensorDataset(torch.stack([train[s : s + n] for s in starts]))
        for split in ("val", "test"):
            stream = self.streams[split]
            count = min(self.eval_blocks, len(stream) // n)
            self.sets[split] = TensorDataset(stream[: count * n].view(count, n))

    def train_dataloader(self) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.sets["train"], batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["val"], batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["test"], batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.sets["val"], batch_size=self.eval_batch_size)


class GPT2ByteLM(LightningModule):
    """``GPT2LMHeadModel`` over bytes (vocabulary 256) from a small ``GPT2Config``.

    The transformers model is ``self.model`` (its ``Conv1D`` layers are
    ``model.transformer.h.0.attn.c_attn`` and so on). Logs ``val_loss`` / ``test_loss``
    (mean cross-entropy per byte, nats; the perplexity is its exponential).

    Args:
        n_embd: embedding width (the MLP is 4x).
        n_layer: transformer blocks.
        n_head: attention heads.
        block: context length.
        lr: AdamW learning rate.
        warmup_steps: linear learning-rate warm-up at the start of training.
    """

    def __init__(
        self,
        n_embd: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        block: int = 128,
        lr: float = 1e-3,
        warmup_steps: int = 50,
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.save_hyperparameters()
        self.lr = lr
        self.warmup_steps = warmup_steps
        config = GPT2Config(
            vocab_size=256,
            n_positions=block,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=tokens).logits
        return logits

    def _loss(self, batch: Any) -> torch.Tensor:
        (window,) = batch
        logits = self(window[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("test_loss", loss)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        logits: torch.Tensor = self(batch[0][:, :-1])
        return logits

    def configure_optimizers(self) -> Any:
        return warmup_adamw(self, self.lr, self.warmup_steps)
