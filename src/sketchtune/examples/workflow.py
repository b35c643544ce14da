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
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

__all__ = ["DenseCopy", "Outcome"]


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
