"""A trial stopped early leaves nothing behind: every recorded accuracy is the plan's own."""

from __future__ import annotations

import copy
from typing import Any

import optuna
import pytest
import torch
from lightning.pytorch import seed_everything
from torchmetrics.classification import MulticlassAccuracy

from sketchtune import LayerConfig, SketchPlan, apply_plan
from sketchtune.nn import SKLinear

from .boring import Classifier, DataModule
from .test_callback import callback, trainer

# with init="sketch", ranks <= 8 stay well below 0.6 and are stopped early; 16 and up are not
RANKS = [1, 2, 4, 8, 16, 32]
FLOOR = 0.6


class MetricClassifier(Classifier):
    """Logs a torchmetrics Metric object, which Lightning accumulates and resets itself."""

    def __init__(self) -> None:
        super().__init__(return_metrics=True)
        self.accuracy = MulticlassAccuracy(num_classes=4, average="micro")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        batch_accuracy = self.accuracy(self(x), y)
        self.log("val_acc", self.accuracy)
        return {"val_acc": batch_accuracy}


def _accuracy(model: Classifier, batches: int = 4) -> float:
    """The validation accuracy of ``model`` on the first ``batches`` batches, by hand."""
    data = DataModule()
    data.setup("validate")
    correct = total = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(data.val_dataloader()):
            if i == batches:
                break
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def _plan(layers: dict[str, Any]) -> SketchPlan:
    return SketchPlan.from_dict({"_type": "sketchtune.SketchPlan", "_version": 1, "layers": layers})


@pytest.mark.parametrize("kind", ["mean", "torchmetrics"])
def test_every_trial_accuracy_matches_an_independent_evaluation(kind: str) -> None:
    seed_everything(0)
    model = Classifier(return_metrics=True) if kind == "mean" else MetricClassifier()
    trainer(max_epochs=3).fit(model, DataModule())
    model.eval()
    dense = copy.deepcopy(model)
    cb = callback(
        run_on="validate",
        configs=LayerConfig(["net.2"], {"num_terms": 1, "low_rank": RANKS}),
        accuracy_threshold=FLOOR,
        default_init="sketch",
        n_trials=len(RANKS),
        sampler=optuna.samplers.BruteForceSampler(seed=0),
    )
    out = trainer(callbacks=[cb]).validate(model, DataModule(), verbose=False)
    assert cb.study is not None
    infos = [
        t.user_attrs["sketchtune"]
        for t in cb.study.trials
        if "plan" in t.user_attrs.get("sketchtune", {})
    ]
    stopped = [i for i, info in enumerate(infos) if info.get("early_stop")]
    assert stopped, "low-rank sketches should be stopped before the last validation batch"
    full_after_stop = [
        i for i, info in enumerate(infos) if not info.get("early_stop") and i > min(stopped)
    ]
    assert full_after_stop, "a full validation must follow a stopped one"
    for info in infos:
        sketched = apply_plan(copy.deepcopy(dense), _plan(info["plan"]))
        real = _accuracy(sketched)
        if info.get("early_stop"):
            # a bound on what the full validation could have reached, below the floor
            assert real <= info["accuracy"] + 1e-6 and info["accuracy"] < FLOOR
        else:
            assert info["accuracy"] == pytest.approx(real, abs=1e-6), info["plan"]
            assert info["feasible"] == (real >= FLOOR)
    # validate() after tuning reports the tuned model's true accuracy
    assert isinstance(model.net[2], SKLinear)
    assert out[0]["val_acc"] == pytest.approx(_accuracy(model), abs=1e-6)
