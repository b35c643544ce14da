"""The per-trial bookkeeping kept cheap: the memory trim's time share and the twin lookup."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from sketchtune import _memory
from sketchtune._search._trialinfo import ATTR, finished_twin


@pytest.mark.skipif(_memory._trim() is None, reason="needs glibc's malloc_trim")
def test_a_trim_with_a_time_share_waits_until_it_fits_the_share() -> None:
    _memory.release_freed_memory()  # always trims: the clock starts here
    ended, took = _memory._LAST
    assert ended > 0.0 and took > 0.0
    _memory.release_freed_memory(share=1e-9)  # the share leaves no room for another yet
    assert [ended, took] == _memory._LAST
    time.sleep(1.5 * took + 0.005)
    _memory.release_freed_memory(share=1.0)  # longer after the last trim than it took
    assert _memory._LAST[0] > ended


def _trial(
    number: int, params: dict[str, object], *, measured: bool = True
) -> optuna.trial.FrozenTrial:
    distributions = {
        name: CategoricalDistribution([True, False])
        if isinstance(value, bool)
        else IntDistribution(0, 64)
        for name, value in params.items()
    }
    trial = create_trial(
        params=params,
        distributions=distributions,  # type: ignore[arg-type]
        value=1.0,
        state=TrialState.COMPLETE,
        user_attrs={ATTR: {"accuracy": 0.9}} if measured else {},
    )
    trial.number = number
    return trial


def test_a_twin_has_the_same_parameters_of_the_same_types_and_was_measured() -> None:
    asked = _trial(5, {"fc.enabled": True, "fc.low_rank": 8})
    others = [
        _trial(0, {"fc.enabled": True, "fc.low_rank": 16}),  # another rank
        _trial(1, {"fc.enabled": 1, "fc.low_rank": 8}),  # equal as a dict, but an int, not a bool
        _trial(2, {"fc.enabled": True, "fc.low_rank": 8}, measured=False),  # never evaluated
        asked,  # the trial itself
    ]
    assert finished_twin(asked, others) is None
    twin = _trial(3, {"fc.enabled": True, "fc.low_rank": 8})
    assert finished_twin(asked, [*others, twin]) is twin
