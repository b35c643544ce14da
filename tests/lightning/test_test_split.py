"""The callback reports the held-out test metrics of the dense and the tuned model."""

from __future__ import annotations

from typing import Any

import optuna
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from sketchtune import LayerConfig, SketchTuneCallback

from .boring import Classifier, DataModule, make_data


class WithTest(DataModule):
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.test = make_data(256, seed=2)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.test, batch_size=self.batch_size)


class ClassifierWithTest(Classifier):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test_acc", (logits.argmax(1) == y).float().mean())
        self.log("test_loss", F.cross_entropy(logits, y))


def _callback(**kwargs: Any) -> SketchTuneCallback:
    return SketchTuneCallback(
        LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [2]}),
        accuracy_threshold=0.0,
        n_trials=1,
        seed=0,
        speed="flops",
        strategy="sampler",
        sampler=optuna.samplers.GridSampler({"net.2.num_terms": [1], "net.2.low_rank": [2]}),
        **kwargs,
    )


def _trainer(tmp_path: Any, callback: SketchTuneCallback, **kwargs: Any) -> Trainer:
    return Trainer(
        max_epochs=2,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_train_batches=8,
        deterministic=True,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


def _accuracy(model: torch.nn.Module, data: WithTest) -> float:
    x, y = data.test.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_dense_and_tuned_test_metrics_are_reported(tmp_path: Any) -> None:
    seed_everything(0)
    model, data, tuner = ClassifierWithTest(), WithTest(), _callback()
    logger = CSVLogger(str(tmp_path))
    trainer = _trainer(tmp_path, tuner, logger=logger)
    trainer.fit(model, data)
    assert tuner.best_plan and tuner.dense_test_metrics and tuner.tuned_test_metrics
    assert set(tuner.dense_test_metrics) == {"test_acc", "test_loss"}  # the test loop's own
    # the tuned figures are the applied model's own (rank 2 of 128 changes the loss)
    assert abs(tuner.tuned_test_metrics["test_acc"] - _accuracy(model, data)) < 1e-6
    assert tuner.tuned_test_metrics["test_loss"] != tuner.dense_test_metrics["test_loss"]
    # the trainer's metrics are the fit's own again, and the loggers got both figures
    assert "test_acc" not in trainer.callback_metrics
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "sketchtune/dense_test_acc" in logged and "sketchtune/tuned_test_acc" in logged
    # trainer.test afterwards is an ordinary test run of the tuned model
    (metrics,) = trainer.test(model, data, verbose=False)
    assert abs(metrics["test_acc"] - tuner.tuned_test_metrics["test_acc"]) < 1e-6


def test_not_applied_plan_is_tested_swapped_in_then_taken_out(tmp_path: Any) -> None:
    seed_everything(0)
    model, data, tuner = ClassifierWithTest(), WithTest(), _callback(apply_best=False)
    _trainer(tmp_path, tuner, logger=False).fit(model, data)
    assert tuner.dense_test_metrics and tuner.tuned_test_metrics
    assert isinstance(model.net[2], torch.nn.Linear)  # the model stays dense
    assert abs(tuner.dense_test_metrics["test_acc"] - _accuracy(model, data)) < 1e-6
    assert tuner.tuned_test_metrics["test_loss"] != tuner.dense_test_metrics["test_loss"]


def test_no_test_batches_reports_nothing(tmp_path: Any) -> None:
    seed_everything(0)
    tuner = _callback()
    _trainer(tmp_path, tuner, logger=False).fit(ClassifierWithTest(), DataModule())
    assert tuner.best_plan
    assert tuner.dense_test_metrics is None and tuner.tuned_test_metrics is None
