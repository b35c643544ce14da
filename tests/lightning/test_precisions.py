"""Every Lightning precision that runs on a CPU tunes with measured speed (a real Trainer)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from sketchtune import LayerConfig, SketchTuneCallback
from sketchtune.nn import SKLinear

from .boring import Classifier, DataModule

PRECISIONS = ["32-true", "64-true", "bf16-true", "bf16-mixed", "16-true"]


class SGDClassifier(Classifier):
    """Plain SGD: Adam's eps (1e-8) is 0 in float16, so "16-true" training would make NaNs."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _trainer(cb: SketchTuneCallback, precision: str, **kw: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        precision=precision,  # type: ignore[arg-type]
        callbacks=[cb],
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        **kw,
    )


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("finetune_steps", [0, 2])
def test_measured_speed_and_fine_tuning_run_under_every_cpu_precision(
    precision: str, finetune_steps: int
) -> None:
    seed_everything(0)
    cb = SketchTuneCallback(
        LayerConfig(["net.2"], {"num_terms": 1, "low_rank": [4]}),
        speed="measure",  # timed predict_step calls on the precision's batches
        speed_batches=2,
        warmup_batches=1,
        accuracy_threshold=0.0,
        n_trials=1,
        strategy="sampler",
        finetune_steps=finetune_steps,
    )
    model = SGDClassifier(width=512)  # wide enough that the rank-4 sketch can be faster
    _trainer(cb, precision).fit(model, DataModule())  # run_on="fit_end": after training
    assert cb.results is not None and len(cb.results) == 1
    assert bool(cb.results.feasible.iloc[0])  # the trial was judged feasible and then timed
    assert cb.tuner is not None and cb.tuner.records[0].speed is not None
    if cb.best_plan:  # kept when confirmed faster; then it is in the model, in its dtype
        assert isinstance(model.net[2], SKLinear)
        expected = {"64-true": torch.float64, "bf16-true": torch.bfloat16, "16-true": torch.float16}
        assert model.net[2].S1.dtype == expected.get(precision, torch.float32)
