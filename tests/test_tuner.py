from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from sketchtune import Categorical, Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from sketchtune._search._confirm import MIN_ROUNDS, TRIAL_ROUNDS
from sketchtune.nn import SKLinear

from .conftest import MLP, ConvNet, kept

X = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))


def agreement(reference: nn.Module) -> Callable[[nn.Module], float]:
    """Accuracy = agreement of argmax predictions with the dense model's."""
    with torch.no_grad():
        target = reference(X).argmax(1)

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(X).argmax(1) == target).float().mean())

    return accuracy


def sketched_count(model: nn.Module) -> int:
    return sum(isinstance(m, SKLinear) for m in model.modules())


def by_count(penalty: float) -> Callable[[nn.Module], float]:
    """A deterministic accuracy: 1 - penalty per sketched layer."""
    return lambda model: 1.0 - penalty * sketched_count(model)


def configs(
    space: dict[str, Any] | str | None = None, names: Any = ("fc1", "fc2"), **kw: Any
) -> TuningConfigs:
    space = space if space is not None else {"num_terms": [1], "low_rank": [4, 8, 16]}
    return TuningConfigs(
        [LayerConfig(list(names) if isinstance(names, tuple) else names, space, **kw)]
    )


def snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor], bool]:
    return (
        dict(model.named_modules()),
        {k: v.clone() for k, v in model.state_dict().items()},
        model.training,
    )


def assert_unchanged(
    model: nn.Module, snap: tuple[dict[str, nn.Module], dict[str, torch.Tensor], bool]
) -> None:
    modules, state, training = snap
    assert dict(model.named_modules()) == modules
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.training == training


def test_infeasible_trials_are_constraint_violations_and_minus_inf_only_in_the_table(
    mlp: MLP,
) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs(names=("fc2",)),
        lambda m: 0.5 if sketched_count(m) and m.fc2.low_rank < 8 else 0.95,
        accuracy_threshold=0.9,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(
            sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [4, 8, 16]})
        ),
    )
    tuner.tune()
    study = tuner.search_algorithm.study
    assert study is not None
    by_rank = {t.params["low_rank"]: t for t in study.trials}
    assert by_rank[4].constraints == {"accuracy": pytest.approx(0.4)}
    assert math.isfinite(by_rank[4].value) and by_rank[4].value < 0  # a penalty, never -inf
    assert by_rank[8].constraints["accuracy"] < 0 and by_rank[8].value > 1
    df = tuner.get_results_dataframe().set_index("low_rank")
    assert df.loc[4, "score"] == -math.inf and not df.loc[4, "feasible"]
    assert df.loc[8, "feasible"] and df.loc[8, "score"] == pytest.approx(df.loc[8, "speedup"])
    assert kept(tuner) == {
        "fc2": {"num_terms": 1, "low_rank": 8, "init": "svd"}
    }  # fastest feasible
    assert tuner.best_params["fc2"]["params"] == kept(tuner)["fc2"]  # the seed's form
    assert tuner.best_params["fc2"]["copy_weights"] is True
    assert study.best_trial.params == {
        "num_terms": 1,
        "low_rank": 8,
        "init": "svd",
    }  # Optuna agrees


def test_speed_is_timed_interleaved_only_for_feasible_trials(mlp: MLP) -> None:
    calls: list[str] = []

    def speed(model: nn.Module) -> float:
        sketched = sketched_count(model) > 0
        calls.append("sketch" if sketched else "dense")
        return 300.0 if sketched else 100.0

    tuner = SKAutoTuner(
        mlp,
        configs(names=("fc2",)),
        lambda m: 0.5 if sketched_count(m) and m.fc2.low_rank == 4 else 1.0,
        accuracy_threshold=0.9,
        optimization_eval_func=speed,
        num_runs_per_param=2,
        search_algorithm=OptunaSearch(
            sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [4, 8, 16]})
        ),
    )
    tuner.tune()

    def rounds(n: int) -> list[str]:
        # each round times both models; which goes first alternates from round to round
        return [
            name for i in range(n) for name in (("dense", "sketch"), ("sketch", "dense"))[i % 2]
        ]

    # nothing for the infeasible trial; the first feasible one beats the dense model, so it
    # is timed on from TRIAL_ROUNDS to MIN_ROUNDS, which confirm it; the second only ties
    # it and stops at TRIAL_ROUNDS; the kept plan was confirmed in its trial: no re-timing
    assert calls == rounds(MIN_ROUNDS) + rounds(TRIAL_ROUNDS)
    (entry,) = tuner.confirmation_log
    assert entry["retimed"] is False and entry["rounds"] == MIN_ROUNDS
    df = tuner.get_results_dataframe()
    assert sorted(df.speedup.dropna()) == [3.0, 3.0]
    assert sorted(df.speed.dropna()) == [300.0, 300.0]


def test_runs_per_param_reports_the_median() -> None:
    values = iter([0.99] + [0.5, 0.9, 0.7] * 10)  # baseline, then three runs per trial
    tuner = SKAutoTuner(
        MLP(),
        configs({"num_terms": 1, "low_rank": 8}, names=("fc2",)),
        lambda m: next(values),
        num_runs_per_param=3,
        search_algorithm=OptunaSearch(n_trials=1),
    )
    tuner.tune()
    assert tuner.get_results_dataframe().accuracy.tolist() == [0.7]


def test_max_accuracy_drop_is_relative_to_the_dense_model(mlp: MLP) -> None:
    for drop, floor in ((0.25, 0.75), ("10%", 0.9)):
        tuner = SKAutoTuner(
            mlp,
            configs(names=("fc2",)),
            by_count(0.2),
            max_accuracy_drop=drop,
            optimization_eval_func="flops",
            search_algorithm=OptunaSearch(n_trials=3, seed=0),
        )
        tuner.tune()
        assert tuner.dense_accuracy == 1.0
        assert tuner.floor.value == pytest.approx(floor)
        assert bool(tuner.best_plan) is (floor <= 0.8)


def test_separate_strategy_opens_one_study_per_layer_and_validates_the_combination(
    mlp: MLP,
) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs(),
        by_count(0.01),
        accuracy_threshold=0.9,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=3, seed=0),
    )
    tuner.tune()
    assert set(tuner.search_algorithm.studies) == {"fc1", "fc2"}
    assert set(kept(tuner)) == {"fc1", "fc2"}
    assert tuner.combination_log == [
        {
            "layers": ["fc1", "fc2"],
            "accuracy": 0.98,
            "speedup": pytest.approx(tuner.flops_speedup(tuner.best_plan)),
            "feasible": True,
        }
    ]


def test_a_combination_that_breaks_the_floor_backs_off_the_least_efficient_layer(mlp: MLP) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs({"num_terms": 1, "low_rank": 4}),
        by_count(0.08),  # one sketched layer: 0.92 (passes), both: 0.84 (fails)
        accuracy_threshold=0.9,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=1),
    )
    tuner.tune()
    steps = tuner.combination_log
    assert [s["feasible"] for s in steps] == [False, True]
    assert steps[0]["accuracy"] == pytest.approx(0.84)
    # fc2 (64x64) saves more FLOPs than fc1 (32x64) for the same accuracy lost: fc1 goes first
    assert steps[1]["layers"] == ["fc2"]
    assert set(kept(tuner)) == {"fc2"}


def test_joint_strategy_shares_one_parameter_set(mlp: MLP) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs(separate=False),
        by_count(0.0),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=4, seed=1),
    )
    tuner.tune()
    assert list(tuner.search_algorithm.studies) == ["fc1+fc2"]
    shared = {"num_terms": 1, "low_rank": 4, "init": "svd"}
    assert kept(tuner)["fc1"] == kept(tuner)["fc2"] == shared
    assert set(tuner.get_results_dataframe().layer_name) == {"fc1+fc2"}


def test_global_strategy_searches_every_layer_in_one_study_and_evaluates_the_combination(
    mlp: MLP,
) -> None:
    seen: list[tuple[int, int]] = []

    def accuracy(model: nn.Module) -> float:
        if sketched_count(model):
            seen.append(tuple(getattr(m, "low_rank", 0) for m in (model.fc1, model.fc2)))
        return 1.0

    tuner = SKAutoTuner(
        mlp,
        configs(),
        accuracy,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        strategy="global",
        search_algorithm=OptunaSearch(n_trials=12, sampler=optuna.samplers.RandomSampler(seed=0)),
    )
    tuner.tune()
    study = tuner.search_algorithm.study
    assert study is not None
    names = set().union(*(t.params for t in study.trials))
    # every layer may also stay dense; its other parameters are then not asked for
    assert names == {
        "fc1.enabled",
        "fc1.num_terms",
        "fc1.low_rank",
        "fc1.init",
        "fc2.enabled",
        "fc2.num_terms",
        "fc2.init",
        "fc2.low_rank",
    }
    for t in study.trials:
        for layer in ("fc1", "fc2"):
            assert (f"{layer}.low_rank" in t.params) == t.params[f"{layer}.enabled"]
    plans = {json.dumps(t.user_attrs["sketchtune"]["plan"], sort_keys=True) for t in study.trials}
    assert len(seen) == len(
        [p for p in plans if p != "{}"]
    )  # each distinct combination evaluated once
    assert tuner.combination_log == []  # the winner was itself a measured combination
    df = tuner.get_results_dataframe()
    assert tuner.best_plan is not None
    assert tuner.flops_speedup(tuner.best_plan) == pytest.approx(df.speedup.max())


def test_duplicate_suggestions_are_answered_from_the_finished_trial(mlp: MLP) -> None:
    evaluations: list[int] = []

    def accuracy(model: nn.Module) -> float:
        evaluations.append(sketched_count(model))
        return 1.0

    tuner = SKAutoTuner(
        mlp,
        configs({"num_terms": 1, "low_rank": [4, 8]}, names=("fc2",)),
        accuracy,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=8, sampler=optuna.samplers.RandomSampler(seed=0)),
    )
    tuner.tune()
    study = tuner.search_algorithm.study
    assert study is not None
    assert len(study.trials) == 8 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert evaluations == [0, 1, 1]  # the dense baseline, then each distinct plan once
    twins = [t for t in study.trials if "duplicate_of" in t.user_attrs["sketchtune"]]
    assert len(twins) == 6
    for t in twins:
        original = study.trials[t.user_attrs["sketchtune"]["duplicate_of"]]
        assert original.params == t.params and original.value == t.value


def test_the_model_is_left_exactly_as_it_was(mlp: MLP) -> None:
    mlp.eval()
    snap = snapshot(mlp)
    tuner = SKAutoTuner(
        mlp,
        configs(),
        agreement(mlp),
        accuracy_threshold=0.5,
        search_algorithm=OptunaSearch(n_trials=3),
    )
    tuner.tune()
    assert_unchanged(mlp, snap)


def test_an_eval_error_propagates_after_restoring_the_model(mlp: MLP) -> None:
    snap = snapshot(mlp)

    def accuracy(model: nn.Module) -> float:
        if sketched_count(model):
            raise RuntimeError("evaluation bug")
        return 1.0

    tuner = SKAutoTuner(mlp, configs(), accuracy, search_algorithm=OptunaSearch(n_trials=3))
    with pytest.raises(RuntimeError, match="evaluation bug"):
        tuner.tune()
    assert_unchanged(mlp, snap)
    study = tuner.search_algorithm.studies["fc1"]
    assert tuner.search_algorithm.study is study  # the study that was running
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_ctrl_c_ends_the_search_cleanly_keeping_finished_trials(
    mlp: MLP, capsys: pytest.CaptureFixture[str]
) -> None:
    snap = snapshot(mlp)
    calls = {"n": 0}

    def accuracy(model: nn.Module) -> float:
        calls["n"] += 1
        if calls["n"] == 4:  # baseline + 2 finished trials, then Ctrl-C in the third
            raise KeyboardInterrupt
        return 1.0

    tuner = SKAutoTuner(
        mlp,
        configs(names=("fc2",), space={"num_terms": 1, "low_rank": Int(2, 16)}),
        accuracy,
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        verbose=True,
        search_algorithm=OptunaSearch(
            n_trials=10,
            sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [8, 4, 2]}),
        ),
    )
    tuner.tune()
    assert tuner.interrupted
    assert_unchanged(mlp, snap)
    df = tuner.get_results_dataframe()
    assert df.state.tolist().count("COMPLETE") == 2 and df.state.tolist().count("FAIL") == 1
    assert tuner.best_plan is not None and len(tuner.best_plan) == 1
    assert (
        "interrupted: the model is restored and 2 finished trial(s) are kept in memory"
        in capsys.readouterr().out
    )


def test_non_finite_metrics_fail_the_trial_with_a_reason_and_the_study_continues(mlp: MLP) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs(names=("fc2",)),
        lambda m: float("nan") if sketched_count(m) and m.fc2.low_rank == 4 else 1.0,
        accuracy_threshold=0.5,
        optimization_eval_func=lambda m: (
            float("inf") if sketched_count(m) and m.fc2.low_rank == 8 else 10.0
        ),
        search_algorithm=OptunaSearch(
            sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [4, 8, 16]})
        ),
    )
    tuner.tune()
    df = tuner.get_results_dataframe().set_index("low_rank")
    assert df.loc[4, "state"] == "FAIL" and df.loc[4, "reason"] == "accuracy_eval_func returned nan"
    assert (
        df.loc[8, "state"] == "FAIL"
        and df.loc[8, "reason"] == "optimization_eval_func returned inf"
    )
    assert df.loc[16, "state"] == "COMPLETE"


def test_apply_best_params_and_replace_without_tuning(mlp: MLP) -> None:
    x = X[:5]
    grid = optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [4, 8, 16]})
    tuner = SKAutoTuner(
        mlp,
        configs(),
        by_count(0.0),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(sampler=grid),
    )
    tuner.tune()
    model = tuner.apply_best_params()
    assert model is mlp and isinstance(mlp.fc1, SKLinear) and mlp.fc1.low_rank == 4
    assert mlp.fc1.seed == tuner.layer_seed("fc1")
    assert mlp(x).shape == (5, 10)

    fresh = MLP()
    SKAutoTuner(
        fresh, configs({"num_terms": [2, 1], "low_rank": Int(8, 16)}), by_count(0.0)
    ).replace_without_tuning()
    assert (fresh.fc1.num_terms, fresh.fc1.low_rank) == (2, 8)


def test_sketches_are_seeded_the_same_parameters_give_the_same_accuracy() -> None:
    torch.manual_seed(0)
    model = MLP()
    accuracy = agreement(model)
    results = []
    for _ in range(2):
        tuner = SKAutoTuner(
            model,
            configs({"num_terms": 1, "low_rank": [4, 8, 16]}, names=("fc1",)),
            accuracy,
            search_algorithm=OptunaSearch(
                sampler=optuna.samplers.GridSampler({"num_terms": [1], "low_rank": [4, 8, 16]})
            ),
        )
        tuner.tune()
        results.append(
            sorted(
                zip(
                    *[tuner.get_results_dataframe()[c] for c in ("low_rank", "accuracy")],
                    strict=True,
                )
            )
        )
    assert results[0] == results[1]


def test_results_round_trip_through_json_and_reject_bad_files(mlp: MLP, tmp_path: Path) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs(),
        by_count(0.05),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=3, seed=0),
    )
    tuner.tune()
    path = tmp_path / "results.json"
    tuner.save_tuning_results(path)
    assert json.loads(path.read_text())["_type"] == "sketchtune.TuningResults"

    other = SKAutoTuner(MLP(), configs(), by_count(0.05))
    other.load_tuning_results(path)
    assert other.best_params == tuner.best_params
    assert other.get_results_dataframe().equals(tuner.get_results_dataframe())
    assert isinstance(other.apply_best_params().fc1, SKLinear)

    bad = tmp_path / "bad.json"
    for text, match in (
        ("{", r"bad.json is not valid JSON"),
        ('{"_type": "x"}', r"is not a sketchtune results file"),
        (
            '{"_type": "sketchtune.TuningResults", "_version": 7}',
            r"results format version 7; this sketchtune reads up to 1",
        ),
        (
            '{"_type": "sketchtune.TuningResults", "_version": 1, "records": [{"x": 1}]}',
            r"bad.json is malformed",
        ),
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            other.load_tuning_results(bad)
    conv_tuner = SKAutoTuner(
        ConvNet(),
        TuningConfigs([LayerConfig(["conv2"], {"num_terms": 1, "low_rank": 4})]),
        by_count(0.0),
    )
    with pytest.raises(
        ValueError, match=r"was made for another model: it sketches \['fc1', 'fc2'\]"
    ):
        conv_tuner.load_tuning_results(path)


def test_resume_from_sqlite_reuses_finished_trials_and_continues_numbering(
    mlp: MLP, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    evaluations: list[int] = []

    def accuracy(model: nn.Module) -> float:
        evaluations.append(model.fc2.low_rank if sketched_count(model) else 0)
        return 1.0

    def run(n_trials: int, **kw: Any) -> SKAutoTuner:
        tuner = SKAutoTuner(
            mlp,
            configs({"num_terms": 1, "low_rank": Int(2, 32)}, names=("fc2",)),
            accuracy,
            accuracy_threshold=0.5,
            optimization_eval_func="flops",
            search_algorithm=OptunaSearch(
                n_trials=n_trials, storage=storage, study_name="resume", seed=0, **kw
            ),
        )
        tuner.tune()
        return tuner

    first = run(4)
    assert len(evaluations) == 5  # baseline + 4
    second = run(7, load_if_exists=True)
    # the dense model is measured again on resume (and must match the study's record);
    # at most 3 new plans, never a plan evaluated twice
    assert evaluations.count(0) == 2
    plans = [e for e in evaluations if e]
    assert 4 < len(plans) <= 4 + 3
    assert len(set(plans)) == len(plans)
    study = second.search_algorithm.study
    assert study is not None and study.study_name == "resume/fc2"
    assert [t.number for t in study.trials] == list(range(7))
    assert len(second.get_results_dataframe()) == 7
    assert (
        second.best_plan == first.best_plan
        or kept(second)["fc2"]["low_rank"] <= kept(first)["fc2"]["low_rank"]
    )
    with pytest.raises(
        ValueError,
        match=r"study 'resume/fc2' already exists in storage .*; pass load_if_exists=True",
    ):
        run(7)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"configs": configs(names=("fc9",))},
            ValueError,
            r"`configs\[0\].layer_names` names 'fc9', which is not a layer of the model",
        ),
        (
            {"configs": configs({"rank": [4]})},
            ValueError,
            r"parameter\(s\) \['rank'\] not valid for Linear\(32->64\), which is sketched as SKLinear and takes \['init', 'low_rank', 'num_terms'\]",
        ),
        (
            {"configs": configs({"low_rank": [4]})},
            ValueError,
            r"the space needs a value for \['num_terms'\]",
        ),
        (
            {"configs": configs({"num_terms": 1, "low_rank": Int(40, 64)})},
            ValueError,
            r"low_rank=Int\(40, 64\) leaves no value that Linear\(32->64\) can take \(low_rank can be at most min\(in, out\)=32\)",
        ),
        (
            {
                "configs": TuningConfigs(
                    [
                        LayerConfig(["fc1"], {"num_terms": 1, "low_rank": 4}),
                        LayerConfig(r"fc\d", {"num_terms": 1, "low_rank": 4}),
                    ]
                )
            },
            ValueError,
            r"layer 'fc1' is selected by configs\[0\] and configs\[1\]",
        ),
        (
            {"accuracy_threshold": 0.9, "max_accuracy_drop": 0.01},
            ValueError,
            r"give `accuracy_threshold` or `max_accuracy_drop`, not both",
        ),
        (
            {"max_accuracy_drop": "1 point"},
            ValueError,
            r"`max_accuracy_drop` must be a number \(absolute drop\) or a percentage string",
        ),
        (
            {"max_accuracy_drop": -0.1},
            ValueError,
            r"`max_accuracy_drop` must satisfy 0.0 <= max_accuracy_drop, got -0.1",
        ),
        (
            {"optimization_eval_func": "wallclock"},
            ValueError,
            r"`optimization_eval_func` must be one of 'flops'; got 'wallclock'",
        ),
        (
            {"strategy": "greedy"},
            ValueError,
            r"`strategy` must be one of 'separate', 'joint', 'global', 'sampler'; got 'greedy'",
        ),
        (
            {"num_runs_per_param": 0},
            ValueError,
            r"`num_runs_per_param` must be a positive int, got 0",
        ),
        (
            {"accuracy_eval_func": 3},
            TypeError,
            r"`accuracy_eval_func` must be a callable model -> float, got int",
        ),
        ({"model": "model"}, TypeError, r"`model` must be a torch.nn.Module, got str"),
        (
            {"search_algorithm": "tpe"},
            TypeError,
            r"`search_algorithm` must be an OptunaSearch, got str 'tpe'; pass OptunaSearch\(",
        ),
    ],
)
def test_bad_input_is_an_error_before_any_trial(
    mlp: MLP, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {"model": mlp, "configs": configs(), "accuracy_eval_func": by_count(0.0)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        SKAutoTuner(**args)


def test_joint_groups_must_share_a_layer_type() -> None:
    with pytest.raises(
        ValueError,
        match=r"tunes layers of different types jointly \('conv2' \(Conv2d\(16->32, kernel_size=\(3, 3\)\)\), 'fc' \(Linear\(32->5\)\)\)",
    ):
        SKAutoTuner(
            ConvNet(),
            configs({"num_terms": 1, "low_rank": 4}, names=("conv2", "fc"), separate=False),
            by_count(0.0),
        )


def test_an_unreachable_threshold_is_reported_before_the_search(mlp: MLP) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs(),
        lambda m: 0.8,
        accuracy_threshold=0.9,
        search_algorithm=OptunaSearch(n_trials=2),
    )
    with pytest.raises(
        ValueError,
        match=r"accuracy_threshold=0.9 is out of reach: the dense model itself scores 0.8",
    ):
        tuner.tune()
    study = tuner.search_algorithm.study
    assert study is not None and len(study.trials) == 0


def test_search_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match=r"`direction` must be one of 'maximize'; got 'minimize'"):
        OptunaSearch(direction="minimize")
    with pytest.raises(TypeError, match=r"`sampler` must be an Optuna sampler, got str"):
        OptunaSearch(sampler="tpe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`n_trials` must be a positive int, got 0"):
        OptunaSearch(n_trials=0)
    search = OptunaSearch(storage="postgresql+psycopg://user:secret@127.0.0.1:1/nowhere")
    with pytest.raises(
        ValueError,
        match=r"could not open the Optuna storage 'postgresql\+psycopg://user:\*\*\*@127.0.0.1:1/nowhere'",
    ):
        search.open_study("x")


def test_the_misspelled_seed_keyword_still_works_with_a_deprecation_warning(mlp: MLP) -> None:
    with pytest.warns(DeprecationWarning, match=r"use `optimization_eval_func`"):
        tuner = SKAutoTuner(
            mlp,
            configs(),
            by_count(0.0),
            accuracy_threshold=0.5,
            optmization_eval_func="flops",
            search_algorithm=OptunaSearch(n_trials=2, seed=0),
        )
    tuner.tune()
    assert tuner.get_results_dataframe().speedup.notna().all()


def test_auto_space_holds_only_values_that_save_compute() -> None:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 2))
    tuner = SKAutoTuner(model, TuningConfigs([LayerConfig("0", "auto")]), by_count(0.0))
    space = tuner._studies[0].groups[0].space
    assert space["num_terms"] == Categorical([1])
    # a geometric ladder from rank 1 up to the last rung below the multiply-add break-even;
    # "auto" is the low-rank forms alone ("auto+int8" adds "full" and quant)
    ranks = space["low_rank"].grid()
    assert ranks == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert "quant" not in space
    assert max(ranks) < 256 * 512 / (2 * (256 + 512)) < 96
    with pytest.raises(
        ValueError, match=r"Linear\(512->2\) is too small for any sketch to save compute"
    ):
        SKAutoTuner(model, TuningConfigs([LayerConfig("2", "auto")]), by_count(0.0))


def test_verbose_prints_one_line_per_trial(mlp: MLP, capsys: pytest.CaptureFixture[str]) -> None:
    SKAutoTuner(
        mlp,
        configs(names=("fc2",)),
        by_count(0.0),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        verbose=True,
        search_algorithm=OptunaSearch(n_trials=2, seed=0),
    ).tune()
    out = capsys.readouterr().out
    assert "dense accuracy 1" in out and "accuracy floor: >= 0.5" in out
    lines = [line for line in out.splitlines() if line.startswith("[fc2] trial")]
    assert len(lines) == 2 and all("x (FLOP model)" in line for line in lines)
    assert " | best " in lines[-1]  # the FLOP model's figures need no confirming


def test_model_tree_marks_sketched_layers(mlp: MLP, capsys: pytest.CaptureFixture[str]) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs({"num_terms": 1, "low_rank": 4}, names=("fc2",)),
        by_count(0.0),
        accuracy_threshold=0.5,
        optimization_eval_func="flops",
        search_algorithm=OptunaSearch(n_trials=1, seed=0),
    )
    tuner.tune()
    tuner.apply_best_params()
    tuner.print_model_tree()
    out = capsys.readouterr().out
    assert "fc2: SKLinear  * num_terms=1" in out and "fc1: Linear(32->64)  ." in out
    assert "(* sketched: 1, . sketchable dense: 2)" in out


def test_activation_init_gathers_input_statistics_once_per_layer_and_wins(mlp: MLP) -> None:
    accuracy = agreement(mlp)
    results = {}
    for init in ("sketch", "svd", "activation"):
        tuner = SKAutoTuner(
            mlp,
            configs({"num_terms": 1, "low_rank": [4, 8], "init": [init]}),
            accuracy,
            strategy="global",
            search_algorithm=OptunaSearch(
                sampler=optuna.samplers.GridSampler(
                    {
                        "fc1.low_rank": [4, 8],
                        "fc2.low_rank": [4, 8],
                        "fc1.num_terms": [1],
                        "fc2.num_terms": [1],
                        "fc1.init": [init],
                        "fc2.init": [init],
                        "fc1.enabled": [True],
                        "fc2.enabled": [True],
                    }
                )
            ),
        )
        tuner.tune()
        results[init] = tuner.get_results_dataframe().accuracy.mean()
        if init == "activation":
            for layer in ("fc1", "fc2"):
                calibration = tuner._aids[layer].calibration
                assert calibration is not None
                assert calibration.count == X.shape[0]  # one pass (the baseline), not one per trial
                assert calibration.empty  # freed once factorized
            assert set(tuner._aids["fc1"].factors) == {"activation"}  # one factorization, reused
    assert results["activation"] >= results["svd"] > results["sketch"]


def test_default_init_applies_where_the_space_has_none(mlp: MLP) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs(names=("fc2",)),
        agreement(mlp),
        default_init="svd",
        search_algorithm=OptunaSearch(n_trials=2, seed=0),
    )
    tuner.tune()
    assert {p["init"] for p in kept(tuner).values()} == {"svd"}
    with pytest.raises(
        ValueError, match=r"`default_init` must be one of 'sketch', 'svd', 'activation'"
    ):
        SKAutoTuner(mlp, configs(), agreement(mlp), default_init="pca")
    with pytest.raises(
        ValueError, match=r"starts from the dense weights, but the config has copy_weights=False"
    ):
        SKAutoTuner(
            mlp,
            configs({"num_terms": 1, "low_rank": 4, "init": "svd"}, copy_weights=False),
            agreement(mlp),
        )


def test_a_plan_with_activation_init_applied_without_statistics_uses_svd_quietly(
    mlp: MLP,
) -> None:
    from sketchtune import SketchPlan, apply_plan

    plan = SketchPlan(
        {
            "fc2": {
                "type": "SKLinear",
                "params": {"num_terms": 1, "low_rank": 4, "init": "activation"},
                "seed": 0,
            }
        }
    )
    # issue 13: reloading a tuned model (apply_plan, then its state_dict) prints nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = apply_plan(MLP(), plan)
    assert model.fc2.init == "svd"


def test_the_default_sampler_starts_from_the_most_accurate_plan(mlp: MLP) -> None:
    tuner = SKAutoTuner(
        mlp,
        configs({"num_terms": [1, 2], "low_rank": Int(2, 8), "init": ["svd", "activation"]}),
        agreement(mlp),
        strategy="sampler",
        search_algorithm=OptunaSearch(n_trials=2, seed=0),
    )
    tuner.tune()
    study = tuner.search_algorithm.study
    assert study is not None
    assert study.trials[0].params == {
        "fc1.enabled": True,
        "fc1.num_terms": 2,
        "fc1.low_rank": 8,
        "fc1.init": "activation",
        "fc2.enabled": True,
        "fc2.num_terms": 2,
        "fc2.low_rank": 8,
        "fc2.init": "activation",
    }
