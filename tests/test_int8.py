"""The int8 forms as kinds: the search space, plan entries, apply_plan, the registry, the FLOP model."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from sketchtune import (
    LayerConfig,
    SketchPlan,
    TuningConfigs,
    apply_plan,
    estimate_speedup,
    format_model_tree,
)
from sketchtune._search._studies import StudyLayout
from sketchtune.kinds import Int8LinearKind, LinearKind
from sketchtune.nn import Int8Linear, Int8SKLinear, SKLinear
from sketchtune.registry import kind_named, kind_of, sketch_of, supported_types
from sketchtune.results import RunSummary
from sketchtune.space import Categorical

from .conftest import ConvNet


class Wide(nn.Module):
    """Two layers large enough for int8 to pay (512x512) and a small head (no int8 offered)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(512, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc3 = nn.Linear(512, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(h)))))


def _wide() -> Wide:
    torch.manual_seed(0)
    return Wide().eval()


MIXED = {
    "fc1": {"type": "Int8Linear", "params": {"quant": "int8"}, "seed": 1},
    "fc2": {
        "type": "SKLinear",
        "params": {"num_terms": 1, "low_rank": 32, "init": "svd", "quant": "int8"},
        "seed": 2,
    },
    "fc3": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 32}, "seed": 3},
}


def test_auto_int8_offers_int8_only_where_it_can_pay_and_auto_never() -> None:
    kind = LinearKind()
    for large in (nn.Linear(256, 256), nn.Linear(64, 1024), nn.Linear(1024, 4096)):
        space = kind.auto_int8_space(large)
        assert space["quant"] == Categorical(["none", "int8"])
        assert space["low_rank"].grid()[-1] == "full"  # the int8 weight, after every rank
        assert space["low_rank"].first() == 1
        # "auto" is the low-rank forms alone: the same ranks, no int8
        plain = kind.auto_space(large)
        assert "quant" not in plain and "full" not in plain["low_rank"].grid()
        assert plain["low_rank"].grid() == space["low_rank"].grid()[:-1]
    for small in (nn.Linear(128, 128), nn.Linear(1024, 10)):  # int8 measured no faster there
        assert "quant" not in kind.auto_int8_space(small)
    assert "quant" not in kind.auto_int8_space(nn.Linear(512, 512).double())  # no int8 kernel


def test_the_auto_strings_choose_the_forms_and_a_typo_names_both() -> None:
    model = nn.Sequential(nn.Linear(256, 256))

    def layout(params: str) -> StudyLayout:
        configs = TuningConfigs([LayerConfig(["0"], params)])
        return StudyLayout(model, configs, strategy="global", default_init="svd", seed=0)

    low_rank, mixed = layout("auto"), layout("auto+int8")
    assert "quant" not in low_rank.groups[0].space
    assert mixed.groups[0].space["quant"] == Categorical(["none", "int8"])
    conv = nn.Conv2d(64, 64, 3)  # a kind without int8 forms offers its "auto" space
    assert kind_of(conv).auto_int8_space(conv) == kind_of(conv).auto_space(conv)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=re.escape("'auto' or 'auto+int8', got 'auto+int4'")):
        LayerConfig(["0"], "auto+int4")


def test_search_values_map_to_plan_entries_that_name_the_form() -> None:
    layout = StudyLayout(
        _wide(),
        TuningConfigs([LayerConfig(["fc1", "fc2", "fc3"], "auto+int8")]),
        strategy="global",
        default_init="sketch",
        seed=0,
    )
    group = layout.groups[0]
    values = {
        "fc1": {"num_terms": 1, "low_rank": "full", "init": "svd", "quant": "int8"},
        "fc2": {"num_terms": 1, "low_rank": 32, "init": "svd", "quant": "int8"},
        "fc3": {"num_terms": 1, "low_rank": 32, "init": "svd", "quant": "none"},
    }
    groups = {g.key: g for g in layout.groups}
    assert group.space["quant"].grid() == ["none", "int8"]
    plan = layout.plan_from(list(groups.values()), values)
    entries = {name: (p.type, p.params) for name, p in plan.items()}
    assert entries == {
        "fc1": ("Int8Linear", {"quant": "int8"}),
        "fc2": ("SKLinear", {"num_terms": 1, "low_rank": 32, "init": "svd", "quant": "int8"}),
        "fc3": ("SKLinear", {"num_terms": 1, "low_rank": 32, "init": "svd"}),  # as before int8
    }
    # the full weight in float is the dense layer itself: no entry, the layer stays dense
    dense = {"fc1": {"num_terms": 1, "low_rank": "full", "init": "svd", "quant": "none"}}
    assert not layout.plan_from(list(groups.values()), dense)


def test_a_mixed_plan_builds_each_form_and_reloads_exactly() -> None:
    tuned = apply_plan(_wide(), SketchPlan(MIXED))
    assert isinstance(tuned.fc1, Int8Linear)
    assert isinstance(tuned.fc2, Int8SKLinear) and tuned.fc2.init == "svd"
    assert type(tuned.fc3) is SKLinear and isinstance(tuned.head, nn.Linear)
    x = torch.randn(16, 512)
    with torch.no_grad():
        dense = _wide().fc1(x)
        assert float((tuned.fc1(x) - dense).norm() / dense.norm()) < 0.02  # int8 is close
        out = tuned(x)
    # JSON round trip, apply to a fresh model, load the weights: the same outputs, bit for bit
    plan = SketchPlan.from_json(SketchPlan(MIXED).to_json())
    fresh = apply_plan(_wide(), plan)
    fresh.load_state_dict(tuned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_plans_written_before_int8_still_load() -> None:
    old = (
        '{"_type": "sketchtune.SketchPlan", "_version": 1, "layers": {"fc3": {"type": '
        '"SKLinear", "params": {"num_terms": 1, "low_rank": 8}, "seed": 5}}}'
    )
    model = apply_plan(_wide(), SketchPlan.from_json(old))
    assert type(model.fc3) is SKLinear
    assert sketch_of(model.fc3) == (
        kind_named("SKLinear"),
        {"num_terms": 1, "low_rank": 8, "init": "sketch"},
    )


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (
            {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": "full", "quant": "int8"}},
            r"low_rank='full' \(no factorization\) is not a SKLinear; write the layer as "
            r'\{"type": "Int8Linear", "params": \{"quant": "int8"\}\}',
        ),
        (
            {"type": "Int8Linear", "params": {"quant": "none"}},
            r"quant='none' is not valid for Linear\(512->512\): an int8 layer has quant='int8'",
        ),
        (
            {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 8, "quant": "int4"}},
            r"quant='int4' is not valid for .*quant must be one of \['none', 'int8'\]",
        ),
    ],
)
def test_bad_int8_entries_are_clear_errors(layer: dict[str, object], match: str) -> None:
    model = _wide()
    with pytest.raises(ValueError, match=match):
        apply_plan(model, SketchPlan({"fc1": {**layer, "seed": 0}}))
    assert type(model.fc1) is nn.Linear  # untouched


def test_int8_is_a_form_of_linear_and_never_of_another_type() -> None:
    int8 = kind_named("Int8Linear")
    assert isinstance(int8, Int8LinearKind) and int8.form_of == "SKLinear"
    assert isinstance(kind_of(nn.Linear(8, 8)), LinearKind)  # selection sees one kind
    assert supported_types().count("Linear") == 1
    with pytest.raises(ValueError, match=r"makes 'conv1' a Int8Linear.*it is sketched as SKConv2d"):
        apply_plan(
            ConvNet(), SketchPlan({"conv1": {"type": "Int8Linear", "params": {}, "seed": 0}})
        )
    tuned = apply_plan(_wide(), SketchPlan(MIXED))
    assert sketch_of(tuned.fc1) == (int8, {"quant": "int8"})
    found = sketch_of(tuned.fc2)
    assert found is not None and isinstance(found[0], LinearKind)
    assert found[1] == {"num_terms": 1, "low_rank": 32, "init": "svd", "quant": "int8"}


def test_tree_and_flop_model_show_the_forms() -> None:
    tuned = apply_plan(_wide(), SketchPlan(MIXED))
    tree = format_model_tree(tuned)
    assert "fc1: Int8Linear  * quant=int8" in tree
    assert "fc2: Int8SKLinear  * num_terms=1 low_rank=32 init=svd quant=int8" in tree
    assert "(* sketched: 3, . sketchable dense: 1)" in tree
    # multiply-adds do not see precision: the int8 layer saves none, the sketches their rank
    only_int8 = apply_plan(_wide(), SketchPlan({"fc1": MIXED["fc1"]}))
    assert estimate_speedup(only_int8) == pytest.approx(1.0)
    sketched = apply_plan(_wide(), SketchPlan({"fc2": MIXED["fc2"]}))
    assert estimate_speedup(sketched) > 1.3


def test_the_summary_table_shows_each_layer_form() -> None:
    summary = RunSummary(
        monitor="val_acc",
        floor=">= 0.9",
        dense_accuracy=0.95,
        tuned_accuracy=0.94,
        dense_throughput=None,
        tuned_throughput=None,
        dense_weights=1,
        tuned_weights=1,
        plan=SketchPlan(MIXED),
        trials=3,
        feasible=2,
        storage=None,
        study_name=None,
        confirmed_speedup=2.0,
    )
    rows = summary.table().splitlines()
    assert "| layer | form | sketched as | parameters |" in rows
    assert "| fc1 | int8 | Int8Linear | quant=int8 |" in rows
    assert (
        "| fc2 | low-rank, int8 factors | SKLinear | num_terms=1, low_rank=32, init=svd, "
        "quant=int8 |"
    ) in rows
    assert "| fc3 | low-rank | SKLinear | num_terms=1, low_rank=32 |" in rows


def test_transformers_conv1d_has_the_same_int8_forms() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from sketchtune import export_plain
    from sketchtune.export import load_folded_state_dict
    from sketchtune.kinds.conv1d import Int8Conv1D, Int8SKConv1D

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = Conv1D(1024, 256)  # nf, nx: 256 -> 1024, as GPT-2's MLP
            self.c_proj = Conv1D(256, 1024)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(torch.relu(self.c_fc(x)))

    torch.manual_seed(0)
    dense = Blocks().eval()
    assert kind_of(dense.c_fc).auto_int8_space(dense.c_fc)["quant"].grid() == ["none", "int8"]  # type: ignore[union-attr]
    plan = SketchPlan(
        {
            "c_fc": {"type": "Int8Conv1D", "params": {"quant": "int8"}, "seed": 0},
            "c_proj": {
                "type": "SKConv1D",
                "params": {"num_terms": 1, "low_rank": 16, "init": "svd", "quant": "int8"},
                "seed": 1,
            },
        }
    )
    tuned = apply_plan(copy.deepcopy(dense), plan)
    assert isinstance(tuned.c_fc, Int8Conv1D) and (tuned.c_fc.nx, tuned.c_fc.nf) == (256, 1024)
    assert isinstance(tuned.c_proj, Int8SKConv1D) and tuned.c_proj.nx == 1024
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        reference = dense.c_fc(x)
        error = (tuned.c_fc(x) - reference).norm() / reference.norm()
        assert float(error) < 0.02  # the int8 form of W^T, not of W
        plain = export_plain(tuned.eval())
        torch.testing.assert_close(plain(x), tuned(x), rtol=1e-5, atol=1e-5)
        fresh = load_folded_state_dict(Blocks(), plain.state_dict()).eval()
        assert torch.equal(fresh(x), plain(x))
