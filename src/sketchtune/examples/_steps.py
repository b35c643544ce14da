"""What the example LightningModules share: classification steps and a warmed-up AdamW."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

__all__ = ["ClassifierSteps", "warmup_adamw"]


class ClassifierSteps(LightningModule):
    """Steps of a classifier on ``(inputs, labels)`` batches: logs ``{stage}_loss`` and ``{stage}_acc``.

    ``validation_step`` returns the batch accuracy, so SketchTuneCallback can stop a
    hopeless trial early. Subclasses define ``forward`` and ``configure_optimizers``.
    """

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        logits = self(inputs)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels))
        self.log(f"{stage}_acc", accuracy, prog_bar=True)
        return {f"{stage}_acc": accuracy}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        logits: torch.Tensor = self(batch[0])
        return logits.argmax(1)


def warmup_adamw(module: LightningModule, lr: float, warmup_steps: int) -> dict[str, Any]:
    """AdamW (weight decay 0.01) with a linear warm-up over ``warmup_steps`` steps."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
