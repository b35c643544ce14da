from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

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


def test_a_results_file_cannot_make_a_sketch_bigger_than_its_layer(tmp_path: Path) -> None:
    """Plan files and checkpoints are bounded; a results file was not (issue 22.10)."""

    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(512, 512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    configs = TuningConfigs([LayerConfig(["fc"], {"num_terms": 1, "low_rank": [8, 16]})])
    tuner = SKAutoTuner(
        Wide(),
        configs,
        lambda model: 1.0,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=2, seed=0),
    )
    tuner.tune()
    path = tmp_path / "results.json"
    tuner.save_tuning_results(path)
    data = json.loads(path.read_text())
    assert data["best_plan"]["layers"]["fc"]["params"]["num_terms"] == 1
    data["best_plan"]["layers"]["fc"]["params"]["num_terms"] = 100_000  # 6.5 GB of factors
    path.write_text(json.dumps(data))

    other = SKAutoTuner(Wide(), configs, lambda model: 1.0)
    with pytest.raises(
        ValueError,
        match=r"results.json: best_plan\['fc'\]: num_terms=100000, low_rank=\d+ make a sketch of "
        r"[\d,]+ values, more than the 262,144 of .* num_terms \* low_rank must be at most 128\. "
        r"The file is damaged or was edited",
    ):
        other.load_tuning_results(path)
    assert other.best_plan is None  # nothing was taken from the file
    assert isinstance(other.model.fc, torch.nn.Linear)
