"""What the real-model examples share: a dense copy for comparison and the outcome they return.

The examples (``examples/resnet18_mnist.py``, ``bert_classifier.py``, ``gpt2_lm.py``)
follow the workflow users follow: train -> tune on the validation split
(:class:`~sketchtune.SketchTuneCallback`) -> a short recovery fine-tune of the
sketched model (``trainer.fit`` again) -> ``trainer.test`` on the held-out split.
``benchmarks/real_models.py`` runs them and times what they return.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from typing_extensions import override

from sketchtune import SketchTuneCallback, select_layers

__all__ = ["DenseCopy", "Outcome", "quiet_trainer_args", "run_workflow"]


class DenseCopy(Callback):
    """Keeps a copy of the model as training left it, before the tuner sketches it.

    List it before :class:`~sketchtune.SketchTuneCallback` in ``callbacks``: Lightning
    calls ``on_train_end`` in that order.
    """

    def __init__(self) -> None:
        self.model: LightningModule | None = None
        #: ``time.perf_counter()`` when training ended (and tuning began)
        self.trained_at = 0.0

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trained_at = time.perf_counter()
        self.model = copy.deepcopy(pl_module).eval()


@dataclass
class Outcome:
    """One example's run: the metric at each step, the speedup and what was sketched.

    ``*_val`` are validation figures (what the tuner selected on), ``*_test`` held-out
    test figures; ``tuned`` is right after tuning, ``recovered`` after the recovery
    fine-tune. ``speedup`` is the callback's confirmed measurement (7 interleaved rounds).
    """

    name: str
    metric: str
    dense_val: float | None
    tuned_val: float | None
    dense_test: float | None
    tuned_test: float | None
    recovered_val: float | None
    recovered_test: float | None
    speedup: float | None
    plan: dict[str, Any]
    layers_selected: list[str]
    train_seconds: float
    tune_seconds: float
    recovery_seconds: float
    trials: int
    dense_model: LightningModule | None = field(default=None, repr=False)
    model: LightningModule | None = field(default=None, repr=False)
    example_input: Any = field(default=None, repr=False)


def quiet_trainer_args(out: Path) -> dict[str, Any]:
    """Trainer arguments shared by the examples' steps: no logger, checkpoints or summary."""
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "deterministic": True,
        "default_root_dir": str(out),
    }


def run_workflow(
    name: str,
    model: LightningModule,
    data: LightningDataModule,
    tuner: SketchTuneCallback,
    selector: Any,
    *,
    key: str,
    epochs: int,
    recovery_lr: float,
    recovery: dict[str, Any],
    quiet: dict[str, Any],
    example_input: Callable[[Any], Any],
) -> Outcome:
    """Train -> tune on validation -> recovery fit -> test; what each step measured.

    Args:
        name: the row's name in tables.
        model: the LightningModule to train (it ends up sketched and recovered).
        data: train/validation/test (and predict) splits.
        tuner: the configured :class:`~sketchtune.SketchTuneCallback`.
        selector: the layers ``tuner`` selects (to report how many it could sketch).
        key: the metric's suffix as logged (``"acc"`` for ``val_acc``/``test_acc``, or ``"loss"``).
        epochs: training epochs before tuning.
        recovery_lr: the learning rate of the recovery fit (warm-up shortened to one step).
        recovery: Trainer arguments of the recovery fit (``max_epochs``, limits).
        quiet: Trainer arguments shared by every step (:func:`quiet_trainer_args`).
        example_input: the model's input from a predict batch (for timing the result).
    """
    dense = DenseCopy()  # a copy of the trained dense model, to compare against

    # 1. train, then tune on the validation split (the callback runs when training ends)
    start = time.perf_counter()
    Trainer(max_epochs=epochs, callbacks=[dense, tuner], **quiet).fit(model, data)
    tuned_at = time.perf_counter()
    tuned_val = tuner.best_accuracy

    # 2. recovery: go on training the sketched model briefly, at a lower learning rate
    setattr(model, "lr", recovery_lr)  # noqa: B010 - the examples' modules read self.lr
    if hasattr(model, "warmup_steps"):
        setattr(model, "warmup_steps", 1)  # noqa: B010
    trainer = Trainer(**{**quiet, **recovery})
    trainer.fit(model, data)
    recovered_at = time.perf_counter()
    (val,) = trainer.validate(model, data, verbose=False)

    # 3. the held-out test split
    (test,) = Trainer(**quiet).test(model, data, verbose=False)
    dense_test, tuned_test = tuner.dense_test_metrics or {}, tuner.tuned_test_metrics or {}
    metric = f"test_{key}"
    print(
        f"{metric}: dense {dense_test.get(metric, float('nan')):.4f}, tuned "
        f"{tuned_test.get(metric, float('nan')):.4f}, after recovery {test[metric]:.4f}; "
        f"speedup {tuner.best_speedup or 1.0:.2f}x (confirmed)"
    )
    return Outcome(
        name=name,
        metric="accuracy" if key == "acc" else key,
        dense_val=tuner.dense_accuracy,
        tuned_val=tuned_val,
        dense_test=dense_test.get(metric),
        tuned_test=tuned_test.get(metric),
        recovered_val=val[f"val_{key}"],
        recovered_test=test[metric],
        speedup=tuner.best_speedup,
        plan=tuner.best_plan.to_dict()["layers"] if tuner.best_plan else {},
        layers_selected=select_layers(dense.model or model, selector),
        train_seconds=dense.trained_at - start,
        tune_seconds=tuned_at - dense.trained_at,
        recovery_seconds=recovered_at - tuned_at,
        trials=0 if tuner.results is None else len(tuner.results),
        dense_model=dense.model,
        model=model,
        example_input=example_input(next(iter(data.predict_dataloader()))),
    )
