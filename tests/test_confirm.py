"""Never slower: a plan is kept only when a repeated interleaved measurement confirms it faster."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from torch import nn

from sketchtune import LayerConfig, OptunaSearch, SKAutoTuner, SketchPlan, TuningConfigs
from sketchtune._search._confirm import (
    MAX_ROUNDS,
    MIN_ROUNDS,
    Confirmation,
    busy_note,
    wants_more,
)
from sketchtune._search._decision import Decision, kept_text


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


def test_one_lying_round_does_not_make_the_trials_figure() -> None:
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
    assert list(df.speedup) == [pytest.approx(0.8)]  # the median of the trial's rounds
    assert not tuner.best_plan and tuner.best_speedup is None
    assert tuner.confirmation is None
    with pytest.warns(UserWarning, match="the model stays dense"):
        model = tuner.apply_best_params()
    assert ranks(model) == (0, 0)  # nothing swapped in


def test_a_plan_measured_in_another_run_is_confirmed_here_before_it_is_kept(
    tmp_path: Path,
) -> None:
    """A finished study resumed on a machine where its fastest plan is slow keeps the next one."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    model = MLP()

    def tuner_on(speed: Callable[[nn.Module], float]) -> SKAutoTuner:
        return SKAutoTuner(
            model,
            TuningConfigs([LayerConfig(["fc2"], {"num_terms": 1, "low_rank": [4, 8]})]),
            lambda m: 1.0,
            accuracy_threshold=0.5,
            optimization_eval_func=speed,
            search_algorithm=OptunaSearch(
                sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [4, 8]}, seed=0),
                storage=storage,
                study_name="machines",
                load_if_exists=True,
            ),
        )

    first = tuner_on(lambda m: {0: 100.0, 4: 400.0, 8: 200.0}[ranks(m)[1]])
    first.tune()
    assert first.best_speedup == pytest.approx(4.0)
    # Another machine: the rank-4 plan runs at half the dense speed there, rank 8 at 1.5x.
    second = tuner_on(lambda m: {0: 100.0, 4: 50.0, 8: 150.0}[ranks(m)[1]])
    second.tune()  # the budget is used up: no trial runs, the decision is confirmed here
    assert second.best_params["fc2"]["params"] == {"num_terms": 1, "low_rank": 8, "init": "svd"}
    assert second.best_speedup == pytest.approx(1.5)
    slow, kept = second.confirmation_log
    assert slow["retimed"] and not slow["confirmed"] and slow["speedup"] == pytest.approx(0.5)
    assert kept["retimed"] and kept["confirmed"]
    assert second.kept is not None and second.kept.speedup == pytest.approx(1.5)


def test_the_kept_figure_is_the_trials_confirmed_rounds_and_optunas_value() -> None:
    pairs: list[tuple[str, float]] = []
    noise = iter([1.0, 0.9, 1.1, 1.05, 0.95, 1.0, 1.02, 0.98] * 40)

    def speed(model: nn.Module) -> float:
        value = (100.0 if ranks(model) == (0, 0) else 160.0) * next(noise)
        pairs.append(("dense" if ranks(model) == (0, 0) else "plan", value))
        return value

    tuner = tuner_for(speed, [8])
    tuner.tune()
    # one trial, timed until confirmed; nothing timed after it (it was confirmed in its trial)
    assert len(pairs) == 2 * MIN_ROUNDS
    ratios = []
    for i in range(MIN_ROUNDS):
        a, b = pairs[2 * i], pairs[2 * i + 1]
        dense, plan = (a, b) if a[0] == "dense" else (b, a)
        assert {dense[0], plan[0]} == {"dense", "plan"}
        ratios.append(plan[1] / dense[1])
    assert tuner.best_speedup == pytest.approx(statistics.median(ratios))
    assert tuner.confirmation is not None and tuner.confirmation["confirmed"]
    study = tuner.search_algorithm.study
    assert study is not None
    assert study.best_trial.value == pytest.approx(tuner.best_speedup)  # one number
    assert tuner.kept is not None and tuner.kept.number == study.best_trial.number
    assert study.user_attrs["sketchtune:kept"]["speedup"] == pytest.approx(tuner.best_speedup)
    assert tuner.confirmation_log[0]["retimed"] is False  # confirmed in its trial
    best = tuner.tune()
    assert best["fc2"]["score"] == tuner.best_speedup
    assert best["fc2"]["trial"] == tuner.kept.number


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


def test_a_wide_interval_is_timed_to_the_last_round_and_said_to_be_from_a_busy_machine() -> None:
    # the main job beside two busy loops: confirmed (lower end above 1) but the interval
    # spans 3.2x-8.9x; quiet runs span at most 1.5x
    busy = Confirmation.of([100.0] * 5, [100.0 * r for r in (3.0, 9.0, 4.0, 8.5, 6.0)])
    quiet = Confirmation.of([100.0] * 5, [100.0 * r for r in (8.9, 9.1, 9.0, 9.3, 8.8)])
    assert busy.confirmed and not busy.precise
    assert quiet.confirmed and quiet.precise
    assert wants_more(busy, beat=1.0)  # a would-be best on a busy machine gets more rounds
    assert not wants_more(quiet, beat=1.0)
    wide = busy.extended([100.0] * (MAX_ROUNDS - 5), [300.0, 900.0, 400.0, 850.0][: MAX_ROUNDS - 5])
    assert wide.rounds == MAX_ROUNDS and not wide.precise
    assert not wants_more(wide, beat=1.0)  # never past the last round
    note = busy_note(busy.lower, busy.upper)
    assert f"{busy.lower:.2f}x-{busy.upper:.2f}x" in note and "busy" in note
    assert busy_note(quiet.lower, quiet.upper) == ""
    assert busy.to_dict()["precise"] is False and quiet.to_dict()["precise"] is True
    # what the user reads: the verdict and summary.md carry the note
    decision = Decision(
        plan=SketchPlan(), trial=0, speedup=busy.speedup, accuracy=1.0, confirmation=busy.to_dict()
    )
    assert note in kept_text(decision)
    quiet_decision = dataclasses.replace(decision, confirmation=quiet.to_dict())
    assert "busy" not in kept_text(quiet_decision)


def test_a_narrow_figure_timed_while_others_took_the_cpus_is_said_to_be_from_a_busy_machine() -> (
    None
):
    # beside two busy loops a figure can be steady and still twice its quiet worth
    # (the main job: 14.38x, interval 13.24-15.86x, 8.94x re-timed quietly)
    steady = [100.0 * r for r in (14.0, 14.5, 14.4, 15.0, 14.2)]
    busy = Confirmation.of([100.0] * 5, steady, [0.5, 0.48, 0.52, 0.5, 0.49])
    quiet = Confirmation.of([100.0] * 5, steady, [0.01, 0.0, 0.03, 0.02, 0.0])
    assert busy.precise and busy.busy and busy.others_share == 0.5
    assert quiet.precise and not quiet.busy
    note = busy_note(busy.lower, busy.upper, busy.to_dict()["others_cpu"])
    assert "other processes took 50% of the CPUs" in note and "wide" not in note
    assert busy_note(quiet.lower, quiet.upper, quiet.to_dict()["others_cpu"]) == ""
    decision = Decision(
        plan=SketchPlan(), trial=0, speedup=busy.speedup, accuracy=1.0, confirmation=busy.to_dict()
    )
    assert note in kept_text(decision)
    # stored with each round, read back alike; rounds stored before the share was measured
    # (two values) read as unknown, and an unknown share says nothing
    assert Confirmation.from_rounds(busy.rounds_list()) == busy
    old = Confirmation.from_rounds([[100.0, 1400.0], [100.0, 1450.0]])
    assert old is not None and math.isnan(old.others_share) and not old.busy
    assert old.to_dict()["others_cpu"] is None and old.rounds_list()[0] == [100.0, 1400.0]
    assert Confirmation.from_rounds([[100.0, 1400.0, 0.5, 7.0]]) is None
