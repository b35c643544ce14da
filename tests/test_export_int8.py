"""Deploying int8 plans: folded to torch's dynamic int8 Linear, loaded and run without sketchtune.

What is claimed in ``docs/int8.md`` is tested here: the folded model's ``state_dict``
loads into the dense architecture with torch alone (``load_folded_state_dict``), and
TorchScript (``torch.jit.script`` + ``torch.jit.save``) runs it without sketchtune.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from sketchtune import SketchPlan, apply_plan, export_plain
from sketchtune.export import load_folded_state_dict
from sketchtune.nn.int8 import int8_kernel
from sketchtune.registry import is_sketched

from .test_export import _NO_SKETCHTUNE

pytestmark = pytest.mark.skipif(
    int8_kernel(torch.zeros(1)) != "fbgemm",
    reason="torch's x86/fbgemm quantized engine is not available here",
)


class Net(nn.Module):
    """Every form side by side: int8, a sketch with int8 factors, a float sketch, dense."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(48, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(torch.relu(self.c(h)))


PLAN = {
    "a": {"type": "Int8Linear", "params": {"quant": "int8"}, "seed": 0},
    "b": {
        "type": "SKLinear",
        "params": {"num_terms": 1, "low_rank": 8, "init": "svd", "quant": "int8"},
        "seed": 1,
    },
    "c": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 8, "init": "svd"}, "seed": 2},
}


def _tuned() -> Net:
    torch.manual_seed(0)
    model = apply_plan(Net(), SketchPlan(PLAN)).eval()
    assert isinstance(model, Net)
    return model


def test_int8_layers_fold_to_torch_dynamic_linears_computing_the_same() -> None:
    model = _tuned()
    plain = export_plain(model)
    assert not any(is_sketched(m) for m in plain.modules())
    assert isinstance(plain.a, DynamicLinear)
    assert isinstance(plain.b, nn.Sequential) and all(isinstance(m, DynamicLinear) for m in plain.b)
    assert [m.weight().shape for m in plain.b] == [(16, 64), (64, 16)]
    assert isinstance(plain.c, nn.Sequential) and isinstance(plain.c[0], nn.Linear)
    x = torch.randn(9, 48)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    fresh = load_folded_state_dict(Net(), plain.state_dict()).eval()  # strict
    with torch.no_grad():
        assert torch.equal(fresh(x), plain(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.s.*` is deprecated:DeprecationWarning")
def test_int8_weights_and_torchscript_run_without_sketchtune(tmp_path: Path) -> None:
    model = _tuned()
    plain = export_plain(model)
    x = torch.randn(6, 48)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    torch.save(plain.state_dict(), tmp_path / "weights.pt")
    torch.jit.save(torch.jit.script(plain), tmp_path / "scripted.pt")
    script = _NO_SKETCHTUNE + textwrap.dedent(
        """
        {classes}
        {loader}
        root = {root!r}
        io = torch.load(f"{{root}}/io.pt", weights_only=True)
        weights = torch.load(f"{{root}}/weights.pt", weights_only=True)
        model = load_folded_state_dict(Net(), weights).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
        scripted = torch.jit.load(f"{{root}}/scripted.pt")
        torch.testing.assert_close(scripted(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
        assert "sketchtune" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m]}}
        print("ok")
        """
    ).format(
        classes=inspect.getsource(Net),
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
