"""Every example runs in its reduced mode, so none of them can rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sklearn")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _outputs(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def test_digits_mlp_main_job(tmp_path: Path) -> None:
    tuner = _load("digits_mlp").main(["--quick", "--out", str(tmp_path)])
    assert tuner.results is not None and len(tuner.results) == 4
    assert {
        "results.csv",
        "plan.json",
        "summary.md",
        "pareto.png",
        "history.png",
        "study.db",
    } <= _outputs(tmp_path)
    assert "| dense |" in (tmp_path / "summary.md").read_text()


def test_digits_cnn(tmp_path: Path) -> None:
    tuner = _load("digits_cnn").main(["--quick", "--out", str(tmp_path)])
    assert tuner.results is not None and len(tuner.results) == 3
    assert "results.csv" in _outputs(tmp_path)


def test_tune_checkpoint(tmp_path: Path) -> None:
    accuracy = _load("tune_checkpoint").main(["--quick", "--out", str(tmp_path)])
    assert {"trained.ckpt", "tuned.ckpt"} <= _outputs(tmp_path)
    assert 0.0 <= accuracy <= 1.0


def test_long_sequence_transformer(tmp_path: Path) -> None:
    tuner = _load("long_sequence_transformer").main(["--quick", "--out", str(tmp_path)])
    assert tuner.results is not None and len(tuner.results) == 3
    assert "results.csv" in _outputs(tmp_path)
