"""The digits task: scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes).

Nothing is downloaded: the data ships inside scikit-learn (``pip install
'sketchtune[examples]'``). ``DigitsMLP`` is wide enough (64 -> 1024 -> 1024 ->
1024 -> 10) that sketching pays off on a CPU; ``DigitsCNN`` runs on the digits
upsampled to 32x32 and exercises ``SKConv2d``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsCNN", "DigitsDataModule", "DigitsMLP"]


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits examples need scikit-learn: pip install 'sketchtune[examples]'"
        ) from None
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long)


class DigitsDataModule(LightningDataModule):
    """Digits, split 80/20 with a fixed seed, standardized with the training statistics.

    Args:
        batch_size: training batch size.
        image_size: ``None`` for flat 64-feature vectors (MLP); else images
            ``(1, image_size, image_size)`` upsampled bilinearly (CNN).
        predict_batch_size: batch size of the predict dataloader (the held-out
            split), which SketchTuneCallback times.
        seed: the split's seed.
    """

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int | None = None,
        predict_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.image_size = image_size
        self.predict_batch_size = predict_batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        x, y = _load_digits()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        x, y = x[order], y[order]
        split = int(0.8 * len(x))
        mean, std = x[:split].mean(), x[:split].std()
        x = (x - mean) / std
        if self.image_size is not None:
            x = F.interpolate(
                x.view(-1, 1, 8, 8), size=self.image_size, mode="bilinear", align_corners=False
            )
        self.train_set = TensorDataset(x[:split], y[:split])
        self.val_set = TensorDataset(x[split:], y[split:])

    def train_dataloader(self) -> DataLoader[Any]:
        assert self.train_set is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader[Any]:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.predict_batch_size)

    def predict_dataloader(self) -> DataLoader[Any]:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.predict_batch_size)


class _Classifier(LightningModule):
    """Cross-entropy training; logs ``val_acc`` and returns it per batch (for early stopping)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        accuracy = (logits.argmax(1) == y).float().mean()
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", accuracy, prog_bar=True)
        return {"val_acc": accuracy}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits: torch.Tensor = self(x)
        return logits.argmax(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsMLP(_Classifier):
    """``64 -> hidden x depth -> 10`` MLP with ReLU and dropout.

    Args:
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        dropout: dropout after each hidden layer.
        lr: Adam learning rate.
    """

    def __init__(
        self, hidden: int = 1024, depth: int = 3, dropout: float = 0.1, lr: float = 1e-3
    ) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x.flatten(1))
        return out


class DigitsCNN(_Classifier):
    """A small CNN for ``(1, 32, 32)`` digits: 3x3 convolutions, two of them stride 2.

    Args:
        width: channels of the first convolution (the others use 2x and 4x).
        lr: Adam learning rate.
    """

    def __init__(self, width: int = 32, lr: float = 2e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4 * width, 4 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x).mean((2, 3)))
        return out
