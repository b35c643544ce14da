"""Every Optuna sampler runs a search, with one study and with one study per layer.

The newest Optuna resolved on a fresh machine decides what a sampler holds (5.1's
NSGA-II/III hold a thread lock, which ``copy.deepcopy`` refuses), so this file builds
every sampler ``optuna.samplers`` exports and fails when a new one is not covered.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from torch import nn

from sketchtune import Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune.search import clone_sampler

from .conftest import MLP

X = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))


class UncopyableSampler(optuna.samplers.RandomSampler):
    """A user's own sampler holding something that cannot be copied (a live generator)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self.feed = (i for i in range(10**9))


PER_LAYER_GRID = {"low_rank": [4, 8]}
GLOBAL_GRID = {
    "fc1.enabled": [True],
    "fc2.enabled": [True],
    "fc1.low_rank": [4, 8],
    "fc2.low_rank": [8],
}
SAMPLERS: dict[str, Callable[[dict[str, list[Any]]], optuna.samplers.BaseSampler]] = {
    "TPESampler": lambda grid: optuna.samplers.TPESampler(seed=0),
    "RandomSampler": lambda grid: optuna.samplers.RandomSampler(seed=0),
    "CmaEsSampler": lambda grid: optuna.samplers.CmaEsSampler(seed=0),
    "GPSampler": lambda grid: optuna.samplers.GPSampler(seed=0),
    "QMCSampler": lambda grid: optuna.samplers.QMCSampler(seed=0),
    "NSGAIISampler": lambda grid: optuna.samplers.NSGAIISampler(seed=0),
    "NSGAIIISampler": lambda grid: optuna.samplers.NSGAIIISampler(seed=0),
    "BruteForceSampler": lambda grid: optuna.samplers.BruteForceSampler(seed=0),
    "GridSampler": lambda grid: optuna.samplers.GridSampler(grid),
    "PartialFixedSampler": lambda grid: optuna.samplers.PartialFixedSampler(
        {"num_terms": 1}, optuna.samplers.RandomSampler(seed=0)
    ),
    "UncopyableSampler": lambda grid: UncopyableSampler(seed=0),
}
ABSTRACT = {"BaseSampler", "BaseGASampler"}


def test_every_sampler_optuna_exports_is_covered() -> None:
    exported = {
        name
        for name in optuna.samplers.__all__
        if inspect.isclass(cls := getattr(optuna.samplers, name))
        and issubclass(cls, optuna.samplers.BaseSampler)
    }
    missing = exported - ABSTRACT - set(SAMPLERS)
    assert not missing, f"add these samplers of optuna {optuna.__version__} to SAMPLERS: {missing}"


def agreement(reference: nn.Module) -> Callable[[nn.Module], float]:
    with torch.no_grad():
        target = reference(X).argmax(1)

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(X).argmax(1) == target).float().mean())

    return accuracy


@pytest.fixture(params=["memory", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    # In memory every study has id 0; in SQLite the ids differ, and a search-space cache
    # shared by two studies raises. Both must work.
    return None if request.param == "memory" else f"sqlite:///{tmp_path / 'study.db'}"


def tuner_for(
    sampler: optuna.samplers.BaseSampler, strategy: str, storage: str | None, n_trials: int
) -> SKAutoTuner:
    torch.manual_seed(0)
    model = MLP()
    space: dict[str, Any] = {"low_rank": Int(4, 8, step=4), "num_terms": 1}
    return SKAutoTuner(
        model,
        TuningConfigs([LayerConfig(["fc1", "fc2"], space)]),
        agreement(model),
        accuracy_threshold=0.0,
        optimization_eval_func="flops",
        strategy=strategy,  # type: ignore[arg-type]
        search_algorithm=OptunaSearch(
            n_trials=n_trials, sampler=sampler, storage=storage, study_name="s"
        ),
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_one_study_runs_the_users_sampler_itself(name: str, storage: str | None) -> None:
    sampler = SAMPLERS[name](GLOBAL_GRID)
    tuner = tuner_for(sampler, "sampler", storage, n_trials=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Constraints have been set", UserWarning)
        tuner.tune()
    study = tuner.search_algorithm.study
    assert study is not None
    assert study.sampler is sampler  # nothing copied: the object the user passed ran
    df = tuner.get_results_dataframe()
    assert len(df) == (2 if name == "GridSampler" else 4)
    assert (df.state == "COMPLETE").all()
    assert tuner.best_plan


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_one_study_per_layer_gets_its_own_sampler(name: str, storage: str | None) -> None:
    sampler = SAMPLERS[name](PER_LAYER_GRID)
    tuner = tuner_for(sampler, "separate", storage, n_trials=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner.tune()
    studies = tuner.search_algorithm.studies
    assert set(studies) == {"fc1", "fc2"}
    for study in studies.values():
        assert len(study.trials) == 2
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    shared = [w for w in caught if "cannot be copied" in str(w.message)]
    if name == "UncopyableSampler":
        # It still runs, one instance for both studies, and the user is told once why.
        assert studies["fc1"].sampler is studies["fc2"].sampler is sampler
        assert len(shared) == 1
        assert "`sampler` (UncopyableSampler) cannot be copied" in str(shared[0].message)
    else:
        assert studies["fc1"].sampler is not studies["fc2"].sampler
        assert type(studies["fc1"].sampler) is type(sampler)
        assert not shared
    assert tuner.best_plan


class LockedSampler(optuna.samplers.RandomSampler):
    """Holds a lock, as Optuna 5.1's genetic samplers do, and per-study state."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self.guard = threading.Lock()
        self.seen: dict[int, list[int]] = {}


def test_a_clone_shares_locks_and_copies_everything_else() -> None:
    sampler = LockedSampler(seed=0)
    clone = clone_sampler(sampler)
    assert isinstance(clone, LockedSampler) and clone is not sampler
    assert clone.guard is sampler.guard  # a lock guards, it remembers nothing
    assert clone.seen is not sampler.seen
    assert clone._rng is not sampler._rng
    assert clone_sampler(UncopyableSampler(seed=0)) is None
