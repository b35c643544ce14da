"""int8 through Lightning: a digits MLP tuned with the mixed space, checked independently.

The accuracy floor governs every form: the kept plan's reported accuracy must be the
accuracy an evaluation written here (not the Trainer's loop) finds for the tuned
model, and each layer must be the module its plan entry names. Speed is measured by
the search but never asserted here (the machine is shared).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from sketchtune import LayerConfig, SketchedModule, SketchPlan, SketchTuneCallback, apply_plan
from sketchtune.examples.workflow import DenseCopy
from sketchtune.nn import Int8Linear, Int8SKLinear, SKLinear
from sketchtune.nn.int8 import int8_kernel

pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
from sketchtune.examples.digits import DigitsDataModule, DigitsMLP

pytestmark = pytest.mark.skipif(
    int8_kernel(torch.zeros(1)) != "fbgemm",
    reason="torch's x86/fbgemm quantized engine is not available here",
)

#: net.3 is 512x512 (int8 may pay); net.0 (64->512) and the head are left as they are
SPACE = {
    "num_terms": 1,
    "low_rank": [16, 32, 64, "full"],
    "init": ["svd"],
    "quant": ["none", "int8"],
}


def _trainer(**kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = {
        "max_epochs": 3,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**defaults, **kwargs})


def _accuracy(model: nn.Module, data: DigitsDataModule) -> float:
    """Accuracy over the validation split, computed here (not by the Trainer).

    In the validation loader's batches: int8 layers quantize their activations per
    call (one range per batch), so a sample's output may depend on the batch it is in.
    """
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.val_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def _form(module: nn.Module) -> tuple[str, str]:
    """``(plan type, quant)`` a module is, by its class."""
    if isinstance(module, Int8Linear):
        return "Int8Linear", "int8"
    if isinstance(module, Int8SKLinear):
        return "SKLinear", "int8"
    if isinstance(module, SKLinear):
        return "SKLinear", "none"
    return type(module).__name__, "none"


@pytest.mark.slow
def test_mixed_search_on_digits_reports_the_true_accuracy_and_forms(tmp_path: Path) -> None:
    seed_everything(0)
    data = DigitsDataModule(batch_size=64, predict_batch_size=128)
    model = DigitsMLP(hidden=512, depth=2)
    callback = SketchTuneCallback(
        LayerConfig(["net.3"], SPACE),
        max_accuracy_drop=0.02,
        n_trials=6,
        strategy="global",
        speed_batches=2,
        warmup_batches=1,
        seed=0,
        output_dir=str(tmp_path / "out"),
    )
    before = DenseCopy()  # the trained dense model, before the tuner sketches it
    _trainer(callbacks=[before, callback]).fit(model, data)
    summary = callback.summary
    assert summary is not None and callback.results is not None and before.model is not None
    data.setup("validate")
    # the dense figure and the kept plan's figure are the accuracy computed independently
    assert summary.dense_accuracy == pytest.approx(_accuracy(before.model, data), abs=1e-6)
    assert summary.tuned_accuracy == pytest.approx(_accuracy(model, data), abs=1e-6)
    plan = summary.plan
    if plan:  # kept: it keeps the floor and was confirmed faster (never slower)
        assert summary.tuned_accuracy >= summary.dense_accuracy - 0.02 - 1e-9
        assert summary.speedup is not None and summary.speedup > 1.0
    # every planned layer is the module its entry names; the others are dense Linears
    for name, module in model.named_modules():
        if name in ("net.0", "net.3", "net.6"):
            layer = plan.get(name)
            expected = (
                ("Linear", "none")
                if layer is None
                else (
                    layer.type,
                    str(layer.params.get("quant", "none")),
                )
            )
            assert _form(module) == expected, name
    # the trials saw the int8 forms: their parameters and their plans agree
    frame = callback.results
    assert {"net.3.quant", "net.3.low_rank"} <= set(frame.columns)
    assert set(frame["net.3.quant"].dropna()) <= {"none", "int8"}
    # the same plan and weights rebuild the same model on a fresh dense one
    fresh = apply_plan(copy.deepcopy(before.model), SketchPlan.from_json(plan.to_json()))
    fresh.load_state_dict(model.state_dict())
    x = data.val_set.tensors[0]  # type: ignore[union-attr]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_a_checkpoint_with_int8_layers_reloads_exactly(tmp_path: Path) -> None:
    seed_everything(0)
    plan = {
        "net.3": {"type": "Int8Linear", "params": {"quant": "int8"}, "seed": 0},
        "net.0": {
            "type": "SKLinear",
            "params": {"num_terms": 1, "low_rank": 16, "init": "svd", "quant": "int8"},
            "seed": 1,
        },
    }
    wrapped = SketchedModule(DigitsMLP(hidden=512, depth=2), plan)
    data = DigitsDataModule(batch_size=64)
    trainer = _trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(wrapped, data)  # gradients flow through the int8 layers to the float ones
    assert "val_acc" in trainer.callback_metrics
    path = tmp_path / "int8.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SketchedModule.load_from_checkpoint(path, module=DigitsMLP(hidden=512, depth=2))
    assert isinstance(reloaded.module.net[3], Int8Linear)
    assert isinstance(reloaded.module.net[0], Int8SKLinear)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), wrapped.eval()(x))
