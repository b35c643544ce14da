"""The floor when none is given, and per-trial rows that never move a logger's step backwards."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import optuna
import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from sketchtune import LayerConfig
from sketchtune.lightning.callback import DEFAULT_MAX_ACCURACY_DROP

from .boring import Classifier, DataModule
from .test_callback import callback, trainer


def test_no_floor_given_means_a_one_point_drop(caplog: pytest.LogCaptureFixture) -> None:
    seed_everything(0)
    model = Classifier()
    cb = callback(
        accuracy_threshold=None,
        configs=LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [1, 16]}),
        default_init="sketch",
        n_trials=2,
        sampler=optuna.samplers.GridSampler({"net.2.num_terms": [1], "net.2.low_rank": [1, 16]}),
    )
    assert cb.default_floor and cb.max_accuracy_drop == DEFAULT_MAX_ACCURACY_DROP == 0.01
    with caplog.at_level(logging.INFO):
        trainer(callbacks=[cb]).fit(model, DataModule())
    assert "no accuracy floor given; using max_accuracy_drop=0.01" in caplog.text
    assert cb.tuner is not None and cb.dense_accuracy is not None
    assert cb.tuner.floor.value == pytest.approx(cb.dense_accuracy - 0.01)
    df = cb.results
    assert df is not None
    # a rank-1 random sketch loses far more than a point: refused, not kept
    assert not df.set_index("net.2.low_rank").feasible[1]


def test_a_logger_step_never_goes_backwards_even_when_training_goes_on(tmp_path: Path) -> None:
    """The search's rows sit at the step it happened at; the recovery fit continues from it."""
    seed_everything(0)
    logger = CSVLogger(tmp_path, name="run")
    cb = callback()
    t = trainer(
        callbacks=[cb], logger=logger, log_every_n_steps=1, max_epochs=2, limit_train_batches=8
    )
    model = Classifier()
    t.fit(model, DataModule())
    assert t.global_step == 16
    t.fit_loop.max_epochs = 4  # the README's recovery fit: go on training the tuned model
    t.fit(model, DataModule())
    assert t.global_step == 32
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps), "a logger's step went backwards"
    trials = [row for row in rows if row.get("sketchtune/accuracy")]
    assert len(trials) == 3
    assert {int(row["step"]) for row in trials} == {16}  # the step the search ran at
    assert [float(row["sketchtune/trial"]) for row in trials] == [1.0, 2.0, 3.0]  # as logged
    summary = [row for row in rows if row.get("sketchtune/best_speedup")]
    assert len(summary) == 1 and int(summary[0]["step"]) == 16
    assert max(steps) > 16  # training went on after it, forwards
