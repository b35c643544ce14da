from __future__ import annotations

import pytest
from torch import nn

from sketchtune import select_layers
from sketchtune.select import sketchable_layers

from .conftest import MLP, ConvNet, TinyTransformer


def test_regex_is_a_full_match_on_the_qualified_name() -> None:
    assert select_layers(MLP(), r"fc\d") == ["fc1", "fc2"]
    with pytest.raises(
        ValueError,
        match=r"`layer_names`='fc' matched no sketchable layer \(no layer names to tune\)\. Sketchable layers: 'fc1' \(Linear\(32->64\)\)",
    ):
        select_layers(MLP(), "fc")


def test_names_are_exact_or_suffix() -> None:
    model = nn.Sequential()
    model.add_module("block", MLP())
    assert select_layers(model, ["fc1", "block.head"]) == ["block.fc1", "block.head"]
    with pytest.raises(ValueError, match=r"names 'fc9', which is not a layer of the model"):
        select_layers(model, ["fc1", "fc9"])


def test_attention_out_proj_is_never_a_linear_candidate() -> None:
    names = [n for n, _, _ in sketchable_layers(TinyTransformer())]
    assert "attn" in names and "encoder.layers.0.self_attn" in names
    assert not any(n.endswith("out_proj") for n in names)
    assert select_layers(TinyTransformer(), {"type": "Linear"}) == [
        "encoder.layers.0.linear1",
        "encoder.layers.0.linear2",
        "encoder.layers.1.linear1",
        "encoder.layers.1.linear2",
        "head",
    ]
    with pytest.raises(
        ValueError,
        match=r"'attn.out_proj', a NonDynamicallyQuantizableLinear, which is not supported for sketching: it is the out_proj",
    ):
        select_layers(TinyTransformer(), ["attn.out_proj"])


def test_dict_selector_filters_then_indexes_in_model_order() -> None:
    model = TinyTransformer()
    assert select_layers(model, {"type": nn.MultiheadAttention}) == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
        "attn",
    ]
    assert select_layers(model, {"contains": "linear", "indices": [0, -1]}) == [
        "encoder.layers.0.linear1",
        "encoder.layers.1.linear2",
    ]
    assert select_layers(model, {"pattern": r"encoder\..*", "type": "Linear", "range": [1, 3]}) == [
        "encoder.layers.0.linear2",
        "encoder.layers.1.linear1",
    ]
    assert select_layers(model, {"type": ["Linear"], "exclude": ["head", "linear2"]}) == [
        "encoder.layers.0.linear1",
        "encoder.layers.1.linear1",
    ]
    assert select_layers(model, {"type": "Linear", "exclude": r".*linear\d"}) == ["head"]


def test_callable_selector() -> None:
    assert select_layers(
        MLP(), lambda name, m: isinstance(m, nn.Linear) and m.out_features == 64
    ) == ["fc1", "fc2"]


def test_unsupported_and_container_layers_are_explained() -> None:
    with pytest.raises(
        ValueError,
        match=r"'bn', a BatchNorm2d, which is not supported for sketching: sketchtune sketches only Linear, Conv2d, MultiheadAttention",
    ):
        select_layers(ConvNet(), ["bn"])
    with pytest.raises(
        ValueError,
        match=r"'depthwise', a Conv2d, which is not supported for sketching: grouped convolutions \(groups=32\)",
    ):
        select_layers(ConvNet(), "depthwise")
    with pytest.raises(
        ValueError,
        match=r"'encoder', a TransformerEncoder container; select the layers inside it, e\.g\. the regex 'encoder\\\\\.\.\*'",
    ):
        select_layers(TinyTransformer(), ["encoder"])


@pytest.mark.parametrize(
    ("selector", "error", "match"),
    [
        (
            3,
            TypeError,
            r"`layer_names` must be a regex string, a list of layer names, a dict selector or a callable, got 3",
        ),
        (
            {"name": "fc1"},
            ValueError,
            r"unknown key\(s\) \['name'\]; valid keys: \['pattern', 'type'",
        ),
        ({"indices": [5]}, ValueError, r"`layer_names.indices` has 5, but only 3 layer\(s\) match"),
        ({"indices": [0], "range": [0, 1]}, ValueError, r"may have `indices` or `range`, not both"),
        ({"range": [0]}, TypeError, r"`layer_names.range` must be \[start, stop\]"),
        ({"type": 3}, TypeError, r"`layer_names.type` must be a class or a class name, got 3"),
        ("fc[", ValueError, r"`layer_names`='fc\[' is not a valid regular expression"),
        ([1], TypeError, r"must list layer names as strings, got 1"),
    ],
)
def test_bad_selectors(selector: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        select_layers(MLP(), selector)


def test_a_model_without_sketchable_layers_says_so() -> None:
    with pytest.raises(ValueError, match=r"The model has no sketchable layer"):
        select_layers(nn.Sequential(nn.ReLU(), nn.Dropout()), ".*")
