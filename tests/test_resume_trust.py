"""A resumed study is re-judged against today's floor, model and machine before it is used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune.nn import SKLinear

from .lightning.boring import Classifier, DataModule
from .lightning.test_callback import callback, trainer


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(32, 32) for _ in range(6)))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def by_rank(model: nn.Module) -> float:
    """A deterministic accuracy: each sketched layer costs 0.04, 0.02 or 0.01 by its rank."""
    cost = {2: 0.04, 4: 0.02, 8: 0.01}
    return 1.0 - sum(cost[m.low_rank] for m in model.modules() if isinstance(m, SKLinear))


def tuner_for(
    model: nn.Module,
    storage: str,
    *,
    drop: float,
    n_trials: int,
    speed: object = "flops",
    strategy: str = "sampler",
) -> SKAutoTuner:
    return SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(r"layers\.\d+", {"num_terms": 1, "low_rank": [2, 4, 8]})]),
        by_rank,
        max_accuracy_drop=drop,
        optimization_eval_func=speed,  # type: ignore[arg-type]
        strategy=strategy,  # type: ignore[arg-type]
        search_algorithm=OptunaSearch(
            n_trials=n_trials, storage=storage, study_name="s", load_if_exists=True, seed=0
        ),
        verbose=True,
    )


@pytest.mark.parametrize("strategy", ["sampler", "global"])  # global: the planner's path
def test_a_tighter_floor_on_resume_rejudges_every_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy: str
) -> None:
    torch.manual_seed(0)
    model = Deep()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    loose = tuner_for(model, storage, drop=0.10, n_trials=20, strategy=strategy)
    loose.tune()
    assert loose.best_plan and loose.best_accuracy is not None and loose.best_accuracy < 1.0
    capsys.readouterr()

    strict = tuner_for(model, storage, drop=0.0, n_trials=30, strategy=strategy)
    strict.tune()
    out = capsys.readouterr().out
    feasible_then = sum(r.feasible for r in loose.records)
    assert (
        "study 's' was searched against the floor >= 0.9; its 20 finished trial(s) are "
        f"re-judged against today's floor >= 1: {feasible_then} kept the old floor"
    ) in out
    # no stored trial below today's floor counts as feasible, nor is kept
    assert all(r.accuracy == 1.0 for r in strict.records if r.feasible)
    with pytest.warns(UserWarning, match="no trial kept the accuracy floor"):
        tuned = strict.apply_best_params()  # nothing sketched keeps today's floor: stays dense
    assert by_rank(tuned) >= strict.floor.value  # type: ignore[operator]
    assert strict.best_accuracy is None or strict.best_accuracy >= strict.floor.value  # type: ignore[operator]


def test_another_model_with_the_same_dense_score_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    torch.manual_seed(0)
    first = Deep()
    tuner_for(first, storage, drop=0.05, n_trials=3).tune()
    torch.manual_seed(1)
    second = Deep()  # agreement with its own predictions: the same dense score, 1.0
    with pytest.raises(
        ValueError,
        match=r"study 's' in 'sqlite:///.*study.db' was made for another model: the weights of "
        r"'head.bias', 'head.weight', 'layers.0.bias' and \d+ more differ from this model's.*"
        r"Pass a new study_name to tune this model",
    ):
        tuner_for(second, storage, drop=0.05, n_trials=3).tune()
    assert not any(isinstance(m, SKLinear) for m in second.modules())


def test_a_study_searched_with_another_speed_model_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    torch.manual_seed(0)
    model = Deep()
    tuner_for(model, storage, drop=0.05, n_trials=3).tune()
    with pytest.raises(
        ValueError, match=r"speed_model was 'flops', is 'measured'.*Use a new study_name"
    ):
        tuner_for(model, storage, drop=0.05, n_trials=3, speed=lambda m: 1.0).tune()


def test_the_callback_rerun_with_a_tighter_floor_keeps_today_s_floor(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    seed_everything(0)
    model = Classifier()
    trainer().fit(model, DataModule())
    common = {
        "run_on": "validate",
        "storage": storage,
        "accuracy_threshold": None,
        "strategy": "sampler",
        "sampler": None,
        "n_trials": 6,
        "configs": LayerConfig(r"net\.[024]", {"num_terms": 1, "low_rank": [1, 2, 4]}),
    }
    loose = callback(max_accuracy_drop=0.30, apply_best=False, **common)
    trainer(callbacks=[loose]).validate(model, DataModule())
    assert loose.best_plan
    strict = callback(max_accuracy_drop=0.0, **{**common, "n_trials": 8})
    trainer(callbacks=[strict]).validate(model, DataModule())
    assert strict.tuner is not None
    floor = strict.tuner.floor
    (metrics,) = trainer().validate(model, DataModule(), verbose=False)
    assert floor.feasible(metrics["val_acc"])  # the model left behind keeps today's floor
