"""A damaged planner record in a study gives an error naming the study and the way out."""

from __future__ import annotations

import copy
from typing import Any

import optuna
import pytest
import torch

from sketchtune._planner import STUDY_ATTR

from .test_planner import Net, _tuner, trained  # noqa: F401  (a fixture)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda record: record.pop("options"), r"KeyError: 'options'"),
        (
            lambda record: record["frontier"]["moves"].append([99, 0]),
            r"a frontier of \d+ moves with \d+ costs",
        ),
        (lambda record: record.update(unit=3), r"unit 3 is neither"),
    ],
)
def test_a_damaged_planner_record_names_the_study_and_the_fix(
    trained: tuple[Net, torch.Tensor, torch.Tensor],  # noqa: F811
    damage: Any,
    problem: str,
) -> None:
    net, x, y = trained
    storage = optuna.storages.InMemoryStorage()
    first = _tuner(net, x, y, trials=2, storage=storage, study_name="planned")
    first.tune()
    study = optuna.load_study(study_name="planned", storage=storage)
    record = copy.deepcopy(study.user_attrs[STUDY_ATTR])
    damage(record)
    study.set_user_attr(STUDY_ATTR, record)  # the signature still matches this search
    again = _tuner(net, x, y, trials=4, storage=storage, study_name="planned", load_if_exists=True)
    with pytest.raises(
        ValueError,
        match=r"study 'planned' holds a damaged planner record \(its user attribute "
        rf"'sketchtune:planner': {problem}.*new study \(another study_name\), or clear the "
        r"record.*set_user_attr\('sketchtune:planner', None\)",
    ):
        again.tune()
    # the way out works: cleared, the planner plans again and the search goes on
    study.set_user_attr(STUDY_ATTR, None)
    again = _tuner(net, x, y, trials=4, storage=storage, study_name="planned", load_if_exists=True)
    again.tune()
    assert again.planner is not None and not again.planner.loaded
