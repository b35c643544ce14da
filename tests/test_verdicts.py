"""The README's plain-PyTorch quick start keeps a plan on a trained model, and every run says
what it kept or exactly why the model stays dense."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from sketchtune import Categorical, Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs

from .conftest import MLP


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 64 -> 512 -> 512 -> 10 MLP trained on scikit-learn's digits; a held-out split."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1400], order[1400:]
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, 512)
            self.fc2 = nn.Linear(512, 512)
            self.head = nn.Linear(512, 10)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))

    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(10):
        for start in range(0, len(train), 100):
            batch = train[start : start + 100]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval(), x[held_out], y[held_out]


def test_the_readme_quick_start_keeps_a_plan_on_a_trained_mlp(
    digits_mlp: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = digits_mlp

    def evaluate_accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    assert evaluate_accuracy(model) > 0.95
    # The README's block as written (a FLOP speed model instead of the user's timer).
    tuner = SKAutoTuner(
        model=model,
        configs=TuningConfigs(
            [
                LayerConfig(
                    ["fc1", "fc2"],
                    {"num_terms": Categorical([1, 2]), "low_rank": Int(8, 64, step=8)},
                )
            ]
        ),
        accuracy_eval_func=evaluate_accuracy,
        optimization_eval_func="flops",
        accuracy_threshold=0.90,
        search_algorithm=OptunaSearch(n_trials=50, seed=0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fc1's space reaches costly ranks
        best = tuner.tune()
    # With the seed's random-sketch start fc1 kept nothing; the SVD start keeps both.
    assert best["fc1"]["params"] is not None and best["fc2"]["params"] is not None
    assert best["fc1"]["params"]["init"] == "svd"
    tuned = tuner.apply_best_params()
    assert tuner.best_accuracy is not None and tuner.best_accuracy >= 0.90
    assert evaluate_accuracy(tuned) == pytest.approx(tuner.best_accuracy)
    assert tuner.verdict is not None and tuner.verdict.startswith("combined plan of 2")


def tuner_for(mlp: MLP, accuracy: object, speed: object, **kw: object) -> SKAutoTuner:
    return SKAutoTuner(
        mlp,
        TuningConfigs([LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [8, 16]})]),
        accuracy,  # type: ignore[arg-type]
        accuracy_threshold=0.9,
        optimization_eval_func=speed,  # type: ignore[arg-type]
        search_algorithm=OptunaSearch(n_trials=4, seed=0),
        **kw,  # type: ignore[arg-type]
    )


def sketched(model: nn.Module) -> bool:
    return any(type(m).__name__ == "SKLinear" for m in model.modules())


def test_the_floor_broken(mlp: MLP) -> None:
    tuner = tuner_for(mlp, lambda m: 0.5 if sketched(m) else 1.0, "flops")
    tuner.tune()
    assert tuner.verdict == (
        "no trial kept the accuracy floor (>= 0.9): the closest scored 0.5000 (trial 1); "
        "the model stays dense."
    )
    with pytest.warns(UserWarning, match=r"the kept plan is empty: no trial kept the accuracy"):
        tuner.apply_best_params()


def test_feasible_but_not_measured_faster(mlp: MLP) -> None:
    tuner = tuner_for(mlp, lambda m: 1.0, lambda m: 90.0 if sketched(m) else 100.0)
    tuner.tune()
    assert tuner.verdict is not None
    assert tuner.verdict.startswith(
        "2 plan(s) kept the floor, but none was measured faster than the dense model "
        "(fastest 0.90x, trial "
    )
    with pytest.warns(UserWarning, match=r"none was measured faster"):
        tuner.apply_best_params()


def test_feasible_and_measured_faster_but_not_confirmed(mlp: MLP, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def tuner_on(plan_speed: float) -> SKAutoTuner:
        return SKAutoTuner(
            mlp,
            TuningConfigs([LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [8]})]),
            lambda m: 1.0,
            accuracy_threshold=0.9,
            optimization_eval_func=lambda m: plan_speed if sketched(m) else 100.0,
            search_algorithm=OptunaSearch(
                n_trials=1, storage=storage, study_name="s", load_if_exists=True
            ),
        )

    tuner_on(140.0).tune()  # 1.4x where it was searched
    tuner = tuner_on(97.0)  # resumed on a machine where the plan runs at 0.97x
    tuner.tune()
    assert tuner.verdict == (
        "1 plan(s) kept the floor and measured faster, but none was confirmed faster than "
        "the dense model in a repeated interleaved measurement (trial 1: measured 1.40x, "
        "confirmed 0.97x (95% interval 0.97x-0.97x)); the model stays dense."
    )
    with pytest.warns(UserWarning, match=r"none was confirmed faster"):
        tuner.apply_best_params()


def test_a_combination_that_broke_the_floor_names_the_layer_backed_off(mlp: MLP) -> None:
    def accuracy(model: nn.Module) -> float:
        count = sum(type(m).__name__ == "SKLinear" for m in model.modules())
        return 1.0 - 0.08 * count  # one sketched layer passes 0.9, two do not

    tuner = SKAutoTuner(
        mlp,
        TuningConfigs([LayerConfig(["fc1", "fc2"], {"num_terms": 1, "low_rank": 4})]),
        accuracy,
        accuracy_threshold=0.9,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=1),
    )
    tuner.tune()
    assert tuner.verdict == (
        "combined plan of 1 study winner(s) passes: accuracy 0.9200 (>= 0.9), speedup "
        f"{tuner.best_speedup:.2f}x; backed off 'fc1' (the plan of 2 breaks the floor "
        "(accuracy 0.8400, >= 0.9))."
    )
