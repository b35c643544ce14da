"""Never slower: a plan is kept only when a repeated interleaved measurement confirms it faster."""

from __future__ import annotations

import statistics
import warnings
from collections import Counter
from collections.abc import Callable

import optuna
import pytest
from torch import nn

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune._search._confirm import ROUNDS, Confirmation


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc2(self.fc1(x))


def ranks(model: nn.Module) -> tuple[int, ...]:
    return tuple(getattr(m, "low_rank", 0) for m in (model.fc1, model.fc2))


def grid(low_ranks: list[int]) -> OptunaSearch:
    return OptunaSearch(
        sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": low_ranks}, seed=0)
    )


def tuner_for(speed: Callable[[nn.Module], float], low_ranks: list[int]) -> SKAutoTuner:
    return SKAutoTuner(
        MLP(),
        TuningConfigs([LayerConfig(["fc2"], {"num_terms": 1, "low_rank": low_ranks})]),
        lambda m: 1.0,
        accuracy_threshold=0.5,
        optimization_eval_func=speed,
        search_algorithm=grid(low_ranks),
    )


def test_a_plan_whose_single_measurement_lied_is_not_kept() -> None:
    seen: Counter[tuple[int, ...]] = Counter()

    def speed(model: nn.Module) -> float:
        key = ranks(model)
        if key == (0, 0):
            return 100.0
        seen[key] += 1
        return 300.0 if seen[key] == 1 else 80.0  # looks 3x faster once, is 0.8x

    tuner = tuner_for(speed, [4])
    tuner.tune()
    df = tuner.get_results_dataframe()
    assert list(df.speedup) == [3.0]  # what the trial measured, kept in the table
    assert not tuner.best_plan and tuner.best_speedup is None
    assert tuner.confirmation is None
    (entry,) = tuner.confirmation_log
    assert entry["speedup"] == pytest.approx(0.8) and not entry["confirmed"]
    with pytest.warns(UserWarning, match="the model stays dense"):
        model = tuner.apply_best_params()
    assert ranks(model) == (0, 0)  # nothing swapped in


def test_the_next_candidate_is_confirmed_when_the_fastest_lies() -> None:
    seen: Counter[tuple[int, ...]] = Counter()

    def speed(model: nn.Module) -> float:
        key = ranks(model)
        if key == (0, 0):
            return 100.0
        seen[key] += 1
        if key[1] == 4:
            return 500.0 if seen[key] == 1 else 70.0  # lies once
        return 200.0  # rank 8: honestly 2x

    tuner = tuner_for(speed, [4, 8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tuner.tune()
    assert tuner.best_params["fc2"]["params"] == {"num_terms": 1, "low_rank": 8, "init": "svd"}
    assert tuner.best_speedup == pytest.approx(2.0)
    assert [e["confirmed"] for e in tuner.confirmation_log] == [False, True]


def test_the_reported_speedup_is_the_confirming_measurement() -> None:
    pairs: list[tuple[str, float]] = []
    noise = iter([1.0, 0.9, 1.1, 1.05, 0.95, 1.0, 1.02, 0.98] * 40)

    def speed(model: nn.Module) -> float:
        value = (100.0 if ranks(model) == (0, 0) else 160.0) * next(noise)
        pairs.append(("dense" if ranks(model) == (0, 0) else "plan", value))
        return value

    tuner = tuner_for(speed, [8])
    tuner.tune()
    last = pairs[-2 * ROUNDS :]  # the confirmation: dense, plan, dense, plan, ...
    assert [kind for kind, _ in last] == ["dense", "plan"] * ROUNDS
    ratios = [last[i + 1][1] / last[i][1] for i in range(0, len(last), 2)]
    assert tuner.best_speedup == pytest.approx(statistics.median(ratios))
    assert tuner.confirmation is not None and tuner.confirmation["confirmed"]
    assert tuner.confirmation["dense_throughput"] == pytest.approx(
        statistics.median(v for _, v in last[::2])
    )
    best = tuner.tune()  # a second run of the same in-memory study confirms again
    assert best["fc2"]["score"] == tuner.best_speedup


def test_a_combination_that_is_not_faster_is_backed_off() -> None:
    def speed(model: nn.Module) -> float:
        # each layer alone is 1.5x; both together are slower than dense (0.9x)
        sketched = sum(1 for r in ranks(model) if r)
        return {0: 100.0, 1: 150.0, 2: 90.0}[sketched]

    tuner = SKAutoTuner(
        MLP(),
        TuningConfigs([LayerConfig(["fc1", "fc2"], {"num_terms": 1, "low_rank": [8]})]),
        lambda m: 1.0,
        accuracy_threshold=0.5,
        optimization_eval_func=speed,
        search_algorithm=OptunaSearch(n_trials=1, seed=0),
    )
    tuner.tune()
    assert len(tuner.best_plan or {}) == 1
    first, second = tuner.combination_log
    assert first["feasible"] and not first["confirmed"] and first["speedup"] == pytest.approx(0.9)
    assert second["confirmed"] and second["speedup"] == pytest.approx(1.5)
    assert tuner.best_speedup == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("ratios", "confirmed"),
    [
        ([1.3, 1.2, 0.7, 1.25, 1.3, 1.28, 1.22], True),  # one slow round does not sink it
        ([1.05, 0.95, 1.02, 0.98, 1.01, 0.99, 1.0], False),  # indistinguishable from dense
        ([0.8] * 7, False),
        ([1.02] * 7, True),  # consistently faster, if only a little
    ],
)
def test_confirmation_needs_the_bootstrap_lower_bound_above_one(
    ratios: list[float], confirmed: bool
) -> None:
    confirmation = Confirmation.of([100.0] * len(ratios), [100.0 * r for r in ratios])
    assert confirmation.confirmed is confirmed
    assert confirmation.speedup == pytest.approx(statistics.median(ratios))
    assert confirmation.lower <= confirmation.speedup
