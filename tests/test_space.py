from __future__ import annotations

import optuna
import pytest

from sketchtune.space import Categorical, Float, Int, as_spec


def test_reprs_are_readable() -> None:
    assert repr(Int(8, 64, step=8)) == "Int(8, 64, step=8)"
    assert repr(Int(1, 128, log=True)) == "Int(1, 128, log=True)"
    assert repr(Float(0.0, 0.5, step=0.1)) == "Float(0.0, 0.5, step=0.1)"
    assert repr(Categorical([1, 2])) == "Categorical([1, 2])"


def test_legacy_lists_and_fixed_values_become_categorical() -> None:
    assert as_spec([8, 16]) == Categorical([8, 16])
    assert as_spec((1, 2)) == Categorical([1, 2])
    assert as_spec(4) == Categorical([4])
    spec = Int(8, 64, step=8)
    assert as_spec(spec) is spec


def test_dict_round_trip_including_lightning_cli_form() -> None:
    for spec in (Int(8, 64, step=8), Float(1e-5, 1e-2, log=True), Categorical(["softmax", "relu"])):
        assert as_spec(spec.to_dict()) == spec
    cli = {"class_path": "sketchtune.Int", "init_args": {"low": 4, "high": 16, "step": 4}}
    assert as_spec(cli) == Int(4, 16, step=4)


def test_grid_first_and_contains() -> None:
    assert Int(8, 32, step=8).grid() == [8, 16, 24, 32]
    assert Float(0.0, 0.5, step=0.1).grid() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert Int(8, 32, step=8).contains(16) and not Int(8, 32, step=8).contains(12)
    assert Categorical([1, 2]).contains(1) and not Categorical([1, 2]).contains(True)
    assert Int(3, 9).first() == 3 and Categorical(["a", "b"]).first() == "a"
    with pytest.raises(ValueError, match=r"continuous and has no grid; give it a `step`"):
        Float(0.0, 1.0).grid()


def test_suggest_uses_the_matching_optuna_distribution() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    assert Int(8, 64, step=8).suggest(trial, "k") in range(8, 65, 8)
    assert 1e-5 <= Float(1e-5, 1e-2, log=True).suggest(trial, "lr") <= 1e-2
    assert Categorical([1, 2, 3]).suggest(trial, "L") in (1, 2, 3)
    assert isinstance(trial.distributions["k"], optuna.distributions.IntDistribution)
    assert trial.distributions["lr"].log


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Int(64, 8), ValueError, r"`low` must be <= `high`, got Int\(low=64, high=8\)"),
        (lambda: Int(0, 8, log=True), ValueError, r"`low` must be >= 1 when log=True"),
        (lambda: Int(1, 8, step=2, log=True), ValueError, r"`step` must be 1 when log=True"),
        (lambda: Int(8, 100, step=8), ValueError, r"use high=96 or high=104"),
        (lambda: Int(1.5, 8), TypeError, r"`low` must be an int, got 1.5"),
        (lambda: Int(1, 8, step=0), ValueError, r"`step` must be a positive int, got 0"),
        (lambda: Float(0.0, 1.0, log=True), ValueError, r"`low` must be > 0 when log=True"),
        (lambda: Float(1.0, 0.0), ValueError, r"`low` must be <= `high`"),
        (
            lambda: Float(0.1, 1.0, step=0.1, log=True),
            ValueError,
            r"`step` must be None when log=True",
        ),
        (lambda: Float(0.0, float("nan")), ValueError, r"`high` must be a finite number"),
        (lambda: Categorical([]), ValueError, r"`choices` must hold at least one value"),
        (lambda: Categorical("abc"), TypeError, r"`choices` must be a list of values"),
        (lambda: Categorical([1, 1]), ValueError, r"must not repeat a value"),
        (
            lambda: Categorical([object()]),
            TypeError,
            r"may hold only None, bool, int, float or str",
        ),
        (lambda: as_spec({"type": "Normal"}), ValueError, r"unknown spec type 'Normal'"),
        (lambda: as_spec({"type": "Int", "low": 1}), TypeError, r"bad fields for Int"),
        (
            lambda: as_spec(object()),
            TypeError,
            r"must be a Categorical/Int/Float, a list of choices",
        ),
    ],
)
def test_bad_specs_name_the_argument_and_value(make, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        make()
