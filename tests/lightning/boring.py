"""Tiny LightningModule and DataModule for the integration tests (Lightning's BoringModel style)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 512, features: int = 32, classes: int = 4, seed: int = 0) -> TensorDataset:
    """A learnable task: the class is the argmax of a fixed random projection of the input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=torch.Generator().manual_seed(123))
    return TensorDataset(x, (x @ w).argmax(1))


class DataModule(LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train = make_data(1024, seed=0)
        self.val = make_data(256, seed=1)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.val, batch_size=self.batch_size)


class Classifier(LightningModule):
    def __init__(self, width: int = 128, lr: float = 0.01, return_metrics: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor] | None:
        x, y = batch
        logits = self(x)
        accuracy = (logits.argmax(1) == y).float().mean()
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", accuracy)
        # returning the batch metric lets SketchTuneCallback stop hopeless trials early
        return {"val_acc": accuracy} if self.hparams.return_metrics else None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class PacedClassifier(Classifier):
    """A Classifier for multi-process tests: the workers meet before they fit, and trials take time.

    Every process that builds one registers in ``barrier_dir`` and waits (in ``on_fit_start``)
    until ``parties`` have, so no worker can use a shared budget up before the others start;
    each validation batch then sleeps ``val_delay`` seconds, so the workers' trials interleave
    in wall time however fast or loaded the machine is.
    """

    def __init__(
        self,
        barrier_dir: str,
        parties: int,
        val_delay: float = 0.05,
        width: int = 128,
        lr: float = 0.01,
        return_metrics: bool = False,
    ) -> None:
        super().__init__(width=width, lr=lr, return_metrics=return_metrics)

    def on_fit_start(self) -> None:
        import os
        import time
        from pathlib import Path

        directory = Path(self.hparams.barrier_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / str(os.getpid())).touch()
        deadline = time.monotonic() + 300
        while len(list(directory.iterdir())) < self.hparams.parties:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(list(directory.iterdir()))} workers reached the barrier"
                )
            time.sleep(0.05)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor] | None:
        import time

        time.sleep(self.hparams.val_delay)
        return super().validation_step(batch, batch_idx)
