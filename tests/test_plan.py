from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sketchtune import SketchPlan, apply_plan
from sketchtune.nn import SKConv2d, SKLinear
from sketchtune.plan import Swap, build_replacements

from .conftest import MLP, ConvNet


def _plan() -> SketchPlan:
    return SketchPlan(
        {
            "fc1": {
                "type": "SKLinear",
                "params": {"num_terms": 1, "low_rank": 8},
                "seed": 3,
                "dense": "Linear(32->64)",
            },
            "fc2": {"type": "SKLinear", "params": {"num_terms": 2, "low_rank": 4}, "seed": 4},
        }
    )


def test_json_round_trip_and_file(tmp_path: Path) -> None:
    plan = _plan()
    assert SketchPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert SketchPlan.load(tmp_path / "plan.json") == plan
    data = json.loads(plan.to_json())
    assert data["_type"] == "sketchtune.SketchPlan" and data["_version"] == 1
    assert "SKLinear(num_terms=1, low_rank=8)" in repr(plan)


def test_apply_then_load_state_dict_reproduces_the_tuned_model_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tuned = apply_plan(MLP(), _plan())
    with torch.no_grad():  # pretend it was fine-tuned after sketching
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(tuned.state_dict(), tmp_path / "weights.pt")
    _plan().save(tmp_path / "plan.json")

    torch.manual_seed(123)  # a fresh model with other weights
    fresh = apply_plan(MLP(), tmp_path / "plan.json")
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt"))
    x = torch.randn(7, 32)
    assert torch.equal(fresh(x), tuned(x))
    assert isinstance(fresh.fc1, SKLinear) and fresh.fc1.seed == 3


def test_swap_restores_the_exact_modules_even_on_error() -> None:
    model = MLP().eval()
    originals = dict(model.named_children())
    replacements = build_replacements(model, _plan())
    assert all(not m.training for m in replacements.values())  # follows the dense layer's mode
    seen = []

    def fail_inside() -> None:
        with Swap(model, replacements):
            seen.append(model.fc1)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert seen == [replacements["fc1"]]
    assert dict(model.named_children()) == originals


def test_swap_turns_off_the_nested_tensor_fast_path_while_applied() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1)
    assert encoder.use_nested_tensor
    plan = SketchPlan(
        {
            "layers.0.linear1": {
                "type": "SKLinear",
                "params": {"num_terms": 1, "low_rank": 2},
                "seed": 0,
            }
        }
    )
    with Swap(encoder, build_replacements(encoder, plan)):
        assert not encoder.use_nested_tensor
    assert encoder.use_nested_tensor


def test_conv_plan() -> None:
    plan = SketchPlan(
        {"conv2": {"type": "SKConv2d", "params": {"num_terms": 1, "low_rank": 4}, "seed": 0}}
    )
    model = apply_plan(ConvNet(), plan)
    assert isinstance(model.conv2, SKConv2d)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("not json", r"plan is not valid JSON"),
        (
            '{"_type": "other"}',
            r"not a sketchtune plan: expected _type='sketchtune.SketchPlan', got 'other'",
        ),
        (
            '{"_type": "sketchtune.SketchPlan", "_version": 9, "layers": {}}',
            r"format version 9 was written by a newer sketchtune",
        ),
        (
            '{"_type": "sketchtune.SketchPlan", "_version": 1, "layers": []}',
            r"plan.layers must be an object",
        ),
        (
            '{"_type": "sketchtune.SketchPlan", "_version": 1, "layers": {"fc1": {"type": "SKFoo", "params": {}, "seed": 0}}}',
            r"unknown sketched layer type 'SKFoo'",
        ),
        (
            '{"_type": "sketchtune.SketchPlan", "_version": 1, "layers": {"fc1": {"type": "SKLinear", "params": {}}}}',
            r"plan\['fc1'\] lacks \['seed'\]",
        ),
        (
            '{"_type": "sketchtune.SketchPlan", "_version": 1, "layers": {"fc1": {"type": "SKLinear", "params": {}, "seed": -2}}}',
            r"seed must be a non-negative int, got -2",
        ),
    ],
)
def test_malformed_plans_are_clear_errors(data: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SketchPlan.from_json(data)


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        (
            {"fc9": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 2}, "seed": 0}},
            r"names layer\(s\) the model lacks: \['fc9'\]",
        ),
        (
            {"fc1": {"type": "SKConv2d", "params": {"num_terms": 1, "low_rank": 2}, "seed": 0}},
            r"makes 'fc1' a SKConv2d, but the model's 'fc1' is a Linear",
        ),
        (
            {
                "fc1": {
                    "type": "SKLinear",
                    "params": {"num_terms": 1, "low_rank": 2},
                    "seed": 0,
                    "dense": "Linear(32->16)",
                }
            },
            r"made for Linear\(32->16\) at 'fc1', but the model has Linear\(32->64\)",
        ),
        (
            {"fc1": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 99}, "seed": 0}},
            r"low_rank=99 is not valid for Linear\(32->64\): low_rank can be at most min\(in, out\)=32",
        ),
        (
            {"fc1": {"type": "SKLinear", "params": {"rank": 2}, "seed": 0}},
            r"\['rank'\] not valid for .*, which is sketched as SKLinear and takes \['init', 'low_rank', 'num_terms'\]",
        ),
    ],
)
def test_mismatched_plans_leave_the_model_untouched(layers: dict[str, object], match: str) -> None:
    model = MLP()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=match):
        apply_plan(model, SketchPlan(layers))  # type: ignore[arg-type]
    assert dict(model.named_modules()) == before


def test_applying_twice_is_an_error() -> None:
    model = apply_plan(MLP(), _plan())
    with pytest.raises(
        ValueError, match=r"layer 'fc1' is already a SKLinear; apply the plan to a dense model"
    ):
        apply_plan(model, _plan())
