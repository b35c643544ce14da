"""Seed compatibility: one search range over layers of different sizes, tune()'s return value,
``tuner.results``, and config errors raised by ``SKAutoTuner(...)`` rather than by the configs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from optuna.samplers import GridSampler
from torch import nn

from sketchtune import (
    Categorical,
    Int,
    LayerConfig,
    OptunaSearch,
    SKAutoTuner,
    SketchTuneCallback,
    TuningConfigs,
)
from tests.lightning.boring import Classifier, DataModule


class TypicalCNN(nn.Module):
    """An ordinary CNN: RGB input (conv1 allows ranks up to 27), linears of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def always(value: float) -> Any:
    return lambda model: value


def test_the_seed_readme_config_fits_each_layer_of_an_rgb_cnn() -> None:
    configs = TuningConfigs(
        [
            LayerConfig(
                layer_names=["conv1", "conv2"],
                params={"num_terms": Categorical([1, 2, 3]), "low_rank": Int(8, 128, step=8)},
                separate=True,
            )
        ]
    )
    with pytest.warns(UserWarning, match=r"configs\[0\]\.params allows values") as caught:
        tuner = SKAutoTuner(
            TypicalCNN(),
            configs,
            always(1.0),
            accuracy_threshold=0.5,
            optimization_eval_func="flops",
            search_algorithm=OptunaSearch(n_trials=12, seed=0),
        )
    narrowing = [str(w.message) for w in caught if "allows values" in str(w.message)]
    assert len(narrowing) == 1  # one warning per config, naming every narrowed layer
    assert "'conv1' low_rank=Int(8, 24, step=8)" in narrowing[0]
    assert "'conv2' low_rank=Int(8, 128, step=8)" not in narrowing[0]  # 128 fits min(576, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tuner.tune()
    df = tuner.get_results_dataframe()
    assert df[df.layer_name == "conv1"].low_rank.max() <= 24
    assert set(df.layer_name) == {"conv1", "conv2"}
    assert (df.state == "COMPLETE").all()


def test_list_choices_keep_the_members_a_layer_can_take() -> None:
    configs = LayerConfig(r"fc\d", {"num_terms": 1, "low_rank": [8, 16, 32, 64]})
    with pytest.warns(UserWarning, match=r"'fc1' low_rank=Categorical\(\[8, 16, 32\]\)"):
        tuner = SKAutoTuner(TypicalCNN(), configs, always(1.0))
    spaces = {g.names[0]: g.space["low_rank"] for spec in tuner._studies for g in spec.groups}
    assert spaces["fc1"] == Categorical([8, 16, 32])  # Linear(128->48)
    assert spaces["fc2"] == Categorical([8])  # Linear(48->10)


def test_a_joint_group_searches_the_values_valid_for_every_member() -> None:
    configs = LayerConfig(
        ["fc1", "fc2"], {"num_terms": 1, "low_rank": Int(2, 64, step=2)}, separate=False
    )
    with pytest.warns(UserWarning, match=r"the joint group \['fc1', 'fc2'\] low_rank=Int\(2, 10"):
        tuner = SKAutoTuner(TypicalCNN(), configs, always(1.0))
    (group,) = tuner._studies[0].groups
    assert group.space["low_rank"] == Int(2, 10, step=2)


def test_no_value_left_for_a_layer_is_an_error_that_names_the_layer_and_its_limit() -> None:
    with pytest.raises(
        ValueError,
        match=r"configs\[0\]\.params for layer 'conv1': low_rank=Int\(32, 64, step=8\) leaves no "
        r"value that Conv2d\(3->64, kernel_size=\(3, 3\)\) can take \(low_rank can be at most "
        r"min\(in, out\)=27\)\. Include values within that limit",
    ):
        SKAutoTuner(
            TypicalCNN(),
            LayerConfig(["conv1"], {"num_terms": 1, "low_rank": Int(32, 64, step=8)}),
            always(1.0),
        )


def test_plans_read_from_files_are_still_checked_exactly(tmp_path: Path) -> None:
    from sketchtune import SketchPlan, apply_plan

    plan = SketchPlan(
        {"conv1": {"type": "SKConv2d", "params": {"num_terms": 1, "low_rank": 32}, "seed": 0}}
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    with pytest.raises(ValueError, match=r"low_rank=32 is not valid for Conv2d\(3->64"):
        apply_plan(TypicalCNN(), path)


def test_tune_returns_the_seeds_per_layer_mapping_and_results_per_study() -> None:
    model = TypicalCNN()

    def accuracy(m: nn.Module) -> float:
        return 0.0 if isinstance(m.fc2, nn.Module) and type(m.fc2).__name__ == "SKLinear" else 1.0

    tuner = SKAutoTuner(
        model,
        TuningConfigs(
            [
                LayerConfig(["fc1"], {"num_terms": 1, "low_rank": [4, 8]}),
                LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [2, 4]}),
            ]
        ),
        accuracy,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=4, seed=0),
    )
    best = tuner.tune()
    assert set(best) == {"fc1", "fc2"}
    assert best == tuner.best_params  # the seed's tune() returns its best_params
    assert best["fc1"]["params"] == dict(tuner.best_plan["fc1"].params)
    assert best["fc1"]["accuracy"] == tuner.best_accuracy == 1.0
    assert best["fc1"]["score"] == tuner.best_speedup > 1.0
    assert best["fc1"]["speed"] == pytest.approx(tuner.best_speedup)  # FLOP model: speed = speedup
    assert best["fc2"] == {
        "params": None,
        "accuracy": None,
        "speed": None,
        "score": -math.inf,
        "copy_weights": True,
        "trial": None,
    }

    results = tuner.results
    assert set(results) == {"fc1", "fc2"}
    df = tuner.get_results_dataframe()
    for label, trials in results.items():
        rows = df[df.layer_name == label]
        assert len(trials) == len(rows) == 4
        assert [t["params"]["low_rank"] for t in trials] == list(rows.low_rank)
        assert [t["score"] for t in trials] == list(rows.score)
    assert all(t["score"] == -math.inf for t in results["fc2"])  # every fc2 sketch breaks the floor


def test_joint_results_name_every_member_and_survive_a_results_file(tmp_path: Path) -> None:
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(5)))
    tuner = SKAutoTuner(
        model,
        LayerConfig(
            ["0", "1", "2", "3", "4"], {"num_terms": 1, "low_rank": [4, 8]}, separate=False
        ),
        always(1.0),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(
            sampler=GridSampler({"num_terms": [1], "low_rank": [4, 8]}, seed=0)
        ),
    )
    best = tuner.tune()
    assert set(best) == {"0", "1", "2", "3", "4"}
    assert all(entry["params"] == best["0"]["params"] for entry in best.values())
    assert best["0"]["params"]["low_rank"] == 4
    assert list(tuner.results) == ["0+1+2+3+4"]
    path = tmp_path / "results.json"
    tuner.save_tuning_results(path)
    other = SKAutoTuner(
        nn.Sequential(*(nn.Linear(64, 64) for _ in range(5))),
        LayerConfig(
            ["0", "1", "2", "3", "4"], {"num_terms": 1, "low_rank": [4, 8]}, separate=False
        ),
        always(1.0),
    )
    other.load_tuning_results(path)
    assert other.results == tuner.results


@pytest.mark.parametrize(
    ("configs", "match", "seed_words"),
    [
        (
            TuningConfigs([LayerConfig([], {"num_terms": 1, "low_rank": 4})]),
            r"`configs\[0\]\.layer_names` is empty: no layer names were given",
            "no layer names",
        ),
        (
            TuningConfigs([LayerConfig(r"fc9\d", {"num_terms": 1, "low_rank": 4})]),
            r"`configs\[0\]\.layer_names`='fc9\\\\d' matched no sketchable layer \(no layer names",
            "no layer names",
        ),
        (
            TuningConfigs([LayerConfig(["fc1"], {})]),
            r"configs\[0\] has no parameters to tune \(params=\{\}\); give at least one",
            "no parameters to tune",
        ),
        (TuningConfigs([]), r"`configs` holds no LayerConfig; give at least one", "LayerConfig"),
        (
            TuningConfigs([LayerConfig(["pool"], "auto")]),
            r"selects 'pool', a AdaptiveAvgPool2d, which is not supported for sketching",
            "not supported",
        ),
        (
            TuningConfigs([LayerConfig(["fc1"], {"num_terms": 1, "rank": 4})]),
            r"parameter\(s\) \['rank'\] not valid for Linear\(128->48\), which is sketched as "
            r"SKLinear and takes \['init', 'low_rank', 'num_terms'\]",
            "not valid",
        ),
        (
            TuningConfigs([LayerConfig(["fc1"], {"num_terms": [0, 1], "low_rank": 4})]),
            r"num_terms=Categorical\(\[0, 1\]\) allows 0, which is not valid for Linear\(128->48\)",
            "not valid",
        ),
    ],
)
def test_config_problems_are_raised_by_the_tuner_not_the_configs(
    configs: TuningConfigs, match: str, seed_words: str
) -> None:
    """Each message is precise, and keeps the seed's words for code that matches on them."""

    class WithPool(TypicalCNN):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)

    with pytest.raises(ValueError, match=match) as caught:
        SKAutoTuner(WithPool(), configs, always(1.0))
    assert seed_words in str(caught.value)


def test_one_regex_over_linears_of_different_widths_tunes_through_the_callback() -> None:
    torch.manual_seed(0)
    tune = SketchTuneCallback(
        LayerConfig(r"net\.\d+", {"num_terms": 1, "low_rank": [2, 4, 16, 32]}),
        monitor="val_acc",
        max_accuracy_drop=1.0,
        speed="flops",
        n_trials=4,
        run_on="validate",
        seed=0,
    )
    trainer = Trainer(
        callbacks=[tune],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=2,
    )
    with pytest.warns(UserWarning, match=r"'net\.4' low_rank=Categorical\(\[2, 4\]\)"):
        trainer.validate(Classifier(width=64), DataModule())
    df = tune.results
    assert df is not None and len(df) == 4
    for column in [c for c in df.columns if c.endswith("net.4.low_rank")]:
        assert set(df[column].dropna()) <= {2, 4}


def test_warnings_name_the_callers_file() -> None:
    with pytest.warns(UserWarning, match="allows values") as caught:
        SKAutoTuner(
            TypicalCNN(), LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [8, 16]}), always(1.0)
        )
    assert {Path(w.filename).name for w in caught} == {Path(__file__).name}
