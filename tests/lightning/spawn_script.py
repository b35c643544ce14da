"""Run by test_spawn.py: SketchTuneCallback under strategy='ddp_spawn' on 2 CPU processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Trainer

from sketchtune import LayerConfig, SketchTuneCallback
from tests.lightning.boring import Classifier, DataModule


class Marking(Classifier):
    """Leaves a file behind if any training step runs."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        (Path(self.out) / "trained").touch()
        return super().training_step(batch, batch_idx)


def main(out: str) -> None:
    callback = SketchTuneCallback(
        LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [4, 8]}),
        accuracy_threshold=0.0,
        n_trials=2,
        speed="flops",
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(Marking(out), DataModule())


if __name__ == "__main__":
    main(sys.argv[1])
