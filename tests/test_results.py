from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sketchtune import Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune.nn import SKLinear
from sketchtune.results import plot_history, plot_pareto

from .conftest import MLP


def test_plots_are_written_for_a_real_study(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model = MLP()
    tuner = SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["fc1", "fc2"], {"num_terms": 1, "low_rank": Int(2, 16)})]),
        lambda m: 1.0 - 0.1 * sum(isinstance(x, SKLinear) and x.low_rank < 6 for x in m.modules()),
        accuracy_threshold=0.95,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(
            sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [2, 4, 8, 16]})
        ),
    )
    tuner.tune()
    records = tuner.records
    assert {r.feasible for r in records} == {True, False}  # both kinds are drawn
    plot_pareto(
        records,
        tmp_path / "pareto.png",
        floor=tuner.floor.value,
        dense_accuracy=tuner.dense_accuracy,
    )
    plot_history(records, tmp_path / "history.png")
    for name in ("pareto.png", "history.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
