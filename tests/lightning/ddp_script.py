"""Run by test_ddp.py: tune with DDP on 2 CPU processes (Lightning relaunches this script per rank)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import optuna
from lightning.pytorch import Trainer, seed_everything

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.nn import SKLinear
from tests.lightning.boring import Classifier, DataModule


class Recording(Classifier):
    """Writes, per rank, which sketch each validation run evaluated."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def on_validation_epoch_start(self) -> None:
        layer = self.net[2]
        seen = f"{layer.low_rank}:{layer.seed}" if isinstance(layer, SKLinear) else "dense"
        with open(Path(self.out) / f"rank{self.global_rank}.txt", "a") as fh:
            fh.write(seen + "\n")


def main(out: str, storage: str) -> None:
    seed_everything(0)
    model = Recording(out)
    callback = SketchTuneCallback(
        LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [4, 8, 16, 32]}),
        accuracy_threshold=0.0,
        n_trials=4,
        storage=storage,
        study_name="ddp",
        speed="measure",
        speed_batches=2,
        warmup_batches=1,
        sampler=optuna.samplers.RandomSampler(seed=0),
        seed=0,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
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
    trainer.fit(model, DataModule())
    final: Any = model.net[2]
    with open(Path(out) / f"final{trainer.global_rank}.txt", "w") as fh:
        fh.write(f"{type(final).__name__}:{getattr(final, 'low_rank', 0)}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
