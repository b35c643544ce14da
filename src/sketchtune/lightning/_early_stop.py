"""Ending a trial's validation as soon as its running metric proves the floor unreachable."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from sketchtune.evaluate import AccuracyFloor

__all__ = ["EarlyStop", "batch_size"]


class EarlyStop(Callback):
    """Ends a trial's validation once its running metric proves the floor unreachable.

    Needs ``validation_step`` to return the batch's value of the monitored metric
    (``return {"val_acc": acc}``), a known metric range and a single validation
    dataloader on a single process; otherwise it stays idle and the full
    validation runs. The running value is the batch-size weighted mean, as
    Lightning's epoch aggregation of ``self.log`` is.

    The validation loop is ended the way it ends when its data runs out (a
    ``StopIteration``), so it runs its epoch-end hooks and resets every
    accumulated result (``self.log`` values, logged torchmetrics, the user's
    ``on_validation_epoch_end`` resets): nothing of a stopped trial reaches the
    next one. :attr:`bound` then holds the best value the full run could have had.

    Args:
        monitor: the metric's key in what ``validation_step`` returns.
        metric_range: its possible ``(low, high)``, or ``None`` to never stop early.
    """

    def __init__(self, monitor: str, metric_range: tuple[float, float] | None) -> None:
        self.monitor = monitor
        self.metric_range = metric_range
        #: called with ``"batch"`` after every validation batch (the search's progress)
        self.progress: Callable[[str], None] | None = None
        self.floor = AccuracyFloor(None)
        self.bound: float | None = None
        self._total = 0.0
        self._seen = 0

    def arm(self, floor: AccuracyFloor) -> None:
        """Start watching a new validation run against ``floor``."""
        self.floor = floor
        self.bound = None
        self._total = 0.0
        self._seen = 0

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.progress is not None:
            self.progress("batch")
        if self.floor.value is None or self.metric_range is None or trainer.world_size > 1:
            return
        batches = trainer.num_val_batches
        if len(batches) != 1 or not math.isfinite(batches[0]):
            return
        value = outputs.get(self.monitor) if isinstance(outputs, Mapping) else None
        if value is None:
            return
        step_value = float(value)
        low, high = self.metric_range
        if not low <= step_value <= high:
            self.metric_range = None  # not the metric we assumed; never stop early on it
            return
        size = batch_size(batch)
        self._total += step_value * size
        self._seen += size
        remaining = (int(batches[0]) - batch_idx - 1) * size
        best = high if self.floor.mode == "max" else low
        bound = (self._total + remaining * best) / (self._seen + remaining)
        if not self.floor.feasible(bound):
            self.bound = bound
            # The evaluation loop treats this as the end of its data: it finishes the epoch
            # (hooks, metric aggregation, reset of the logged results) as after a last batch.
            raise StopIteration


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch`` (its first tensor's first dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    return 1
