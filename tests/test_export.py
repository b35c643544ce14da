"""export_plain: tuned models folded to plain torch, loaded and run where sketchtune is not importable."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sketchtune import SketchPlan, apply_plan, export_plain
from sketchtune.export import load_folded_state_dict
from sketchtune.registry import is_sketched

from .conftest import MLP, ConvNet, TinyTransformer


def _plan(layers: dict[str, dict[str, object]]) -> SketchPlan:
    """A plan from ``name -> {"type", "params"}``, each layer with its own seed."""
    return SketchPlan(
        {name: {**layer, "seed": i} for i, (name, layer) in enumerate(layers.items())}
    )


def _tuned_mlp() -> MLP:
    torch.manual_seed(0)
    plan = _plan(
        {
            "fc1": {"type": "SKLinear", "params": {"num_terms": 2, "low_rank": 4, "init": "svd"}},
            "fc2": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 8}},
        }
    )
    model = apply_plan(MLP(), plan).eval()
    assert isinstance(model, MLP)
    return model


def _tuned_convnet() -> ConvNet:
    torch.manual_seed(0)
    plan = _plan(
        {
            "conv1": {"type": "SKConv2d", "params": {"num_terms": 1, "low_rank": 4, "init": "svd"}},
            "conv2": {"type": "SKConv2d", "params": {"num_terms": 2, "low_rank": 3}},
            "fc": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 2}},
        }
    )
    model = apply_plan(ConvNet(), plan).eval()
    assert isinstance(model, ConvNet)
    return model


@pytest.mark.parametrize(
    ("make", "shape"), [(_tuned_mlp, (5, 32)), (_tuned_convnet, (2, 3, 9, 11))]
)
def test_the_folded_model_computes_the_same_function_with_plain_modules(
    make: object, shape: tuple[int, ...]
) -> None:
    model = make()  # type: ignore[operator]
    x = torch.randn(*shape)
    plain = export_plain(model)
    assert not any(is_sketched(m) for m in plain.modules())
    assert any(is_sketched(m) for m in model.modules())  # a copy: the model is untouched
    assert plain.training == model.training
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    # the folded state_dict loads into a fresh dense model through the plain-torch helper
    fresh = load_folded_state_dict(type(model)(), plain.state_dict()).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), plain(x))


def test_inplace_folds_the_model_itself() -> None:
    model = _tuned_mlp()
    assert export_plain(model, inplace=True) is model
    assert isinstance(model.fc1, nn.Sequential)
    assert [m.out_features for m in model.fc1] == [2 * 2 * 4, 64]


class Shared(nn.Module):
    """One Linear at two paths (``b`` is ``a``), as tied or reused layers are."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = self.a
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))))


def test_a_layer_held_at_two_paths_is_folded_once_and_stays_shared(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plan = _plan({"a": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 4}}})
    model = apply_plan(Shared(), plan).eval()
    assert is_sketched(model.b) and model.b is model.a  # the plan sketched both paths
    x = torch.randn(5, 32)
    plain = export_plain(model)
    assert isinstance(plain.a, nn.Sequential) and plain.b is plain.a  # folded once, shared
    assert not any(is_sketched(m) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    # plain torch round trip: save, load into a fresh dense model, same outputs, still shared
    torch.save(plain.state_dict(), tmp_path / "weights.pt")
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert {"a.0.weight", "b.0.weight"} <= set(weights)
    fresh = load_folded_state_dict(Shared(), weights).eval()  # strict: nothing missing or extra
    assert isinstance(fresh.a, nn.Sequential) and fresh.b is fresh.a
    with torch.no_grad():
        assert torch.equal(fresh(x), plain(x))
    assert export_plain(model, inplace=True) is model and model.b is model.a
    assert isinstance(model.b, nn.Sequential)


def test_attention_has_no_plain_form_and_says_so() -> None:
    plan = _plan(
        {
            "attn": {"type": "RandMultiHeadAttention", "params": {"num_random_features": 4}},
            "encoder.layers.0.linear1": {
                "type": "SKLinear",
                "params": {"num_terms": 1, "low_rank": 2},
            },
        }
    )
    model = apply_plan(TinyTransformer(), plan).eval()
    with pytest.raises(
        ValueError,
        match=r"1 sketched layer\(s\) have no plain-torch form: 'attn' \(RandMultiHeadAttention\)"
        r".*pass strict=False",
    ):
        export_plain(model)
    partial = export_plain(model, strict=False)
    assert is_sketched(partial.attn)
    assert isinstance(partial.encoder.layers[0].linear1, nn.Sequential)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(partial(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_plain_checks_its_argument() -> None:
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got str"):
        export_plain("model")  # type: ignore[arg-type]


# Runs in a fresh interpreter (-I: no PYTHONPATH, no current directory) in which importing
# sketchtune fails, so nothing below can use it, even indirectly through unpickling.
_NO_SKETCHTUNE = """
import sys
sys.modules["sketchtune"] = None
try:
    import sketchtune
except ImportError:
    pass
else:
    raise SystemExit("sketchtune is importable")
import torch
from torch import nn
"""


def test_folded_weights_and_programs_run_without_sketchtune(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp, convnet = _tuned_mlp(), _tuned_convnet()
    x_mlp, x_conv = torch.randn(4, 32), torch.randn(2, 3, 8, 8)
    for name, model, x in (("mlp", mlp, x_mlp), ("convnet", convnet, x_conv)):
        plain = export_plain(model)
        with torch.no_grad():
            torch.save({"x": x, "y": model(x)}, tmp_path / f"{name}_io.pt")
        torch.save(plain.state_dict(), tmp_path / f"{name}_weights.pt")
        program = torch.export.export(plain, (x,))
        torch.export.save(program, tmp_path / f"{name}.pt2")

    script = _NO_SKETCHTUNE + textwrap.dedent(
        """
        {classes}
        {loader}
        root = {root!r}
        for name, cls in (("mlp", MLP), ("convnet", ConvNet)):
            io = torch.load(f"{{root}}/{{name}}_io.pt", weights_only=True)
            weights = torch.load(f"{{root}}/{{name}}_weights.pt", weights_only=True)
            model = load_folded_state_dict(cls(), weights).eval()
            with torch.no_grad():
                torch.testing.assert_close(model(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
            program = torch.export.load(f"{{root}}/{{name}}.pt2").module()
            torch.testing.assert_close(program(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
        assert "sketchtune" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m]}}
        print("ok")
        """
    ).format(
        classes=inspect.getsource(MLP) + "\n" + inspect.getsource(ConvNet),
        loader=inspect.getsource(load_folded_state_dict).replace("from __future__", "#"),
        root=str(tmp_path),
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
