"""A subclass of a sketchable layer with its own forward is never sketched as its base class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sketchtune import LayerConfig, SKAutoTuner, SketchPlan, TuningConfigs, apply_plan
from sketchtune.nn import SKLinear


class Doubled(nn.Linear):
    """A Linear whose forward does more than ``x W^T + b``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input)


class Plain(nn.Linear):
    """A Linear subclass that keeps Linear's forward: sketched as a Linear."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = Plain(32, 64)
        self.fc2 = Doubled(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


SPACE = {"num_terms": 1, "low_rank": [4]}


def _tuner(selector: object) -> SKAutoTuner:
    return SKAutoTuner(
        Net(),
        TuningConfigs([LayerConfig(selector, SPACE)]),
        lambda model: 1.0,
        accuracy_threshold=0.5,
    )


def test_naming_a_subclass_with_its_own_forward_is_refused_with_how_to_register_a_kind() -> None:
    with pytest.raises(
        ValueError,
        match=r"selects 'fc2', a Doubled, which is not supported for sketching: "
        r"tests\.test_subclasses\.Doubled subclasses Linear with its own forward \(in Doubled\), "
        r"which a SKLinear would not run; register a kind for that class "
        r"\(sketchtune\.registry\.register_kind\) to sketch it",
    ):
        _tuner(["fc2"])


def test_a_pattern_skips_it_with_a_warning_and_a_plan_naming_it_is_refused() -> None:
    with pytest.warns(UserWarning, match=r"also matches 1 layer\(s\) .*1 Doubled \(e\.g\. 'fc2'"):
        tuner = _tuner(r"fc\d")
    assert tuner.study_labels == ["fc1"]  # the Plain subclass is a Linear like any other
    plan = SketchPlan(
        {"fc2": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 4}, "seed": 0}}
    )
    model = Net()
    with pytest.raises(ValueError, match=r"the model's 'fc2' is a Doubled \(.*own forward"):
        apply_plan(model, plan)
    assert type(model.fc2) is Doubled
    fc1 = SketchPlan(
        {"fc1": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 4}, "seed": 0}}
    )
    assert isinstance(apply_plan(model, fc1).fc1, SKLinear)
