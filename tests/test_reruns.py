"""A rerun against a study that already holds trials says so in one line, and how to get more."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs

from .conftest import MLP
from .lightning.boring import Classifier, DataModule
from .lightning.test_callback import callback, trainer


def tuner_for(storage: str, n_trials: int, *, verbose: bool) -> SKAutoTuner:
    torch.manual_seed(0)
    return SKAutoTuner(
        MLP(),
        TuningConfigs([LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [4, 8, 16]})]),
        lambda m: 1.0,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(
            n_trials=n_trials, storage=storage, study_name="rerun", load_if_exists=True
        ),
        verbose=verbose,
    )


def test_a_finished_rdb_study_is_reused_and_the_rerun_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = tuner_for(storage, 3, verbose=True)
    first.tune()
    assert "already has" not in capsys.readouterr().out  # a new study: nothing to say

    second = tuner_for(storage, 3, verbose=True)
    second.tune()
    out = capsys.readouterr().out
    assert (
        f"study 'rerun/fc2' in sqlite:///{tmp_path / 'study.db'} already has 3 trial(s) "
        "(n_trials=3): its budget is used up, so it runs no trial and its result is reused. "
        "For more trials raise n_trials; to start over pass a new study_name."
    ) in out
    assert second.best_plan == first.best_plan

    third = tuner_for(storage, 5, verbose=True)
    third.tune()
    out = capsys.readouterr().out
    assert "already has 3 trial(s) (n_trials=5): they are reused and 2 more will run." in out
    assert len(third.get_results_dataframe()) == 5


def test_the_callback_logs_the_reuse_without_verbose(caplog: pytest.LogCaptureFixture) -> None:
    seed_everything(0)
    model = Classifier()
    cb = callback(run_on="validate", apply_best=False)  # an in-memory study kept across runs
    trainer(callbacks=[cb]).validate(model, DataModule())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer(callbacks=[cb]).validate(model, DataModule())
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "sketchtune: study 'sketchtune' in memory already has 3 trial(s) (n_trials=3): its "
        "budget is used up" in line
        for line in lines
    ), lines
