"""Misconfigurations the callback can see at setup or in the sanity check fail there, before
any training: an empty validation, a monitor the validation loop does not log, a stored study
made for another search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from lightning.pytorch import Callback, seed_everything

from sketchtune import LayerConfig

from .boring import Classifier, DataModule
from .test_callback import callback, trainer


class StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def test_misconfigurations_are_refused_before_training(tmp_path: Path) -> None:
    """What setup and the sanity check can see is checked there, not after hours of training."""
    seed_everything(0)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = callback(storage=storage, study_name="s", run_on="validate")
    trainer(callbacks=[first]).validate(Classifier(), DataModule())  # creates the study

    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({}, {"limit_val_batches": 0}, r"`limit_val_batches`=0 leaves SketchTuneCallback no"),
        (
            {"monitor": "val_accuracy"},
            {"num_sanity_val_steps": 2},
            r"`monitor`='val_accuracy' was not logged by the validation loop; the logged "
            r"metrics are \['val_acc', 'val_loss'\]",
        ),
        (
            {
                "storage": storage,
                "study_name": "s",
                "sampler": optuna.samplers.GridSampler(
                    {"net.2.num_terms": [1], "net.2.low_rank": [4, 8]}
                ),
                "configs": LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [4, 8]}),
            },
            {},
            r"study 's' in .* was created for a different search.*the search space of 'net.2'",
        ),
    ]
    for options, trainer_options, match in cases:
        counter = StepCounter()
        cb = callback(**options)
        with pytest.raises(ValueError, match=match):
            trainer(callbacks=[cb, counter], **trainer_options).fit(Classifier(), DataModule())
        assert counter.steps == 0, match  # refused before the first training step
