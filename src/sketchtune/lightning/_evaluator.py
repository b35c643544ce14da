"""The Trainer as the tuner's evaluator: its validation loop judges accuracy, a timed predict loop speed.

Everything here runs while the search holds the trainer (see ``_TrainerState``
in ``callback.py``): the user's callbacks and loggers are detached, so trials
never write checkpoints, log to the user's loggers or draw progress bars.
"""

from __future__ import annotations

import inspect
import itertools
import math
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import optuna
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from sketchtune._modes import eval_mode
from sketchtune.evaluate import (
    AccuracyFloor,
    Command,
    Evaluator,
    FloorUnreachable,
    RemoteTrial,
    as_metric,
)
from sketchtune.lightning._early_stop import EarlyStop, batch_size
from sketchtune.lightning._finetune import FineTuner, iterate, training_batches
from sketchtune.measure import synchronize
from sketchtune.results import TimingSetup

if TYPE_CHECKING:
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop


#: the least a timing slice lasts, in seconds: whole batches are timed, at least one
SLICE_SECONDS = 0.05


class LightningEvaluator(Evaluator):
    """Accuracy from the Trainer's validation loop, speed from timed ``predict_step`` calls.

    Speed is timed in slices: ``speed_batches`` batches are read once, and each
    :meth:`throughput` call times the next ``slice_batches`` of them (cycling), a
    number chosen once, from the dense model, so a slice lasts at least
    :data:`SLICE_SECONDS`. Both models of a timing round see the same slice.
    """

    def __init__(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        loop: _EvaluationLoop,
        *,
        monitor: str,
        speed: str,
        speed_batches: int,
        warmup_batches: int,
        finetune_steps: int,
        metric_range: tuple[float, float] | None,
    ) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.loop = loop
        self.monitor = monitor
        self.has_throughput = speed == "measure"
        self.speed_batches = speed_batches
        self.warmup_batches = warmup_batches
        self.finetune_steps = finetune_steps
        self.early_stop = EarlyStop(monitor, metric_range)
        self._batches: list[Any] | None = None
        #: batches per timing slice (set when the dense model is first warmed)
        self.slice_batches: int | None = None
        self._round = 0
        self._train_iter: Iterator[Any] | None = None
        self._epoch_length = 1

    # -- accuracy ----------------------------------------------------------------------

    def accuracy(
        self, model: nn.Module, *, trial: optuna.Trial | RemoteTrial | None, floor: AccuracyFloor
    ) -> float:
        if trial is None or self.finetune_steps == 0:
            return self._validate(floor)
        # Per-trial fine-tuning: report the zero-shot, half-way and final accuracy to the pruner.
        checkpoints = sorted({0, self.finetune_steps // 2, self.finetune_steps})
        tuner = self._fine_tuner()
        value = math.nan
        for step in checkpoints:
            tuner.run(step - tuner.steps)
            value = self._validate(floor if step == self.finetune_steps else AccuracyFloor(None))
            prune = False
            if isinstance(trial, optuna.Trial):
                trial.report(value, step)
                prune = trial.should_prune()
            if self._broadcast(prune):
                raise optuna.TrialPruned(f"pruned after {step} fine-tuning steps at {value:.4g}")
        return value

    def pass_batches(self) -> int | None:
        batches = self.trainer.num_val_batches
        total = sum(batches) if batches else math.inf
        return int(total) if math.isfinite(total) and total > 0 else None

    def _validate(self, floor: AccuracyFloor) -> float:
        trainer = self.trainer
        self.early_stop.arm(floor)
        self.early_stop.progress = self.progress
        trainer.callback_metrics.pop(self.monitor, None)
        with _StepOnlyLogs(self.pl_module, self.monitor) as step_only:
            self.loop.run()
        if self.early_stop.bound is not None:
            raise FloorUnreachable(self.early_stop.bound)
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ValueError(missing_monitor(self.monitor, metrics, step_only=step_only.seen))
        value = as_metric(metrics[self.monitor], f"the monitored metric {self.monitor!r}")
        return self._mean(value)

    # -- fine-tuning -------------------------------------------------------------------

    def finetune(self) -> float:
        """Fine-tune the sketched layers in place as a trial does; their accuracy afterwards.

        Used once after the search, on the applied best plan, so that the model
        left behind is a fine-tuned one and the accuracy reported is its own.
        """
        self._fine_tuner().run(self.finetune_steps)
        return self._validate(AccuracyFloor(None))

    def _fine_tuner(self) -> FineTuner:
        """A new optimizer (and LR schedulers) over the model as it is now: one per trial."""
        if self._train_iter is None:
            self._train_iter, self._epoch_length = training_batches(self.trainer, self.pl_module)
        return FineTuner(self.trainer, self.pl_module, self._train_iter, self._epoch_length)

    # -- speed -------------------------------------------------------------------------

    def warm(self, model: nn.Module) -> None:
        batches = self._speed_batches()
        if self.slice_batches is None:
            # The dense model, first: warm it up, then time one batch to size the slices.
            self._run(batches[: self.warmup_batches])
            seconds = self._run(batches[-1:])
            wanted = math.ceil(SLICE_SECONDS / max(self._mean(seconds), 1e-9))
            self.slice_batches = int(min(len(batches), max(1, wanted)))
            return
        self._run(batches[: min(self.warmup_batches, self.slice_batches)])

    def timing_setup(self) -> TimingSetup | None:
        """What one timing slice ran, and where (``None`` before anything was timed)."""
        if not self.has_throughput or self._batches is None or self.slice_batches is None:
            return None
        module = self.pl_module
        return TimingSetup(
            batches_per_slice=self.slice_batches,
            batches=len(self._batches),
            batch_size=batch_size(self._batches[0]),
            device=str(module.device),
            dtype=str(module.dtype).removeprefix("torch."),
            precision=str(self.trainer.precision),
        )

    def start_round(self, index: int) -> None:
        self._round = index

    def throughput(self, model: nn.Module) -> float:
        batches = self._speed_batches()
        size = self.slice_batches or len(batches)
        start = (self._round * size) % len(batches)
        chosen = [batches[(start + i) % len(batches)] for i in range(size)]
        elapsed = self._run(chosen)
        return self._mean(sum(batch_size(b) for b in chosen) / max(elapsed, 1e-9))

    def _run(self, batches: list[Any]) -> float:
        """Seconds ``predict_step`` takes over ``batches`` (in eval and inference mode)."""
        module = self.pl_module
        device = module.device
        with (
            eval_mode(module),
            torch.inference_mode(),
            self.trainer.precision_plugin.predict_step_context(),
        ):
            synchronize(device)
            start = time.perf_counter()
            for i, batch in enumerate(batches):
                self._predict(batch, i)
            synchronize(device)
            return time.perf_counter() - start

    def _predict(self, batch: Any, index: int) -> Any:
        module = self.pl_module
        if is_overridden("predict_step", module, LightningModule):
            return module.predict_step(batch, index)
        if isinstance(batch, (list, tuple)):
            return module(batch[0])
        if isinstance(batch, torch.Tensor):
            return module(batch)
        raise TypeError(
            f"cannot time a {type(batch).__name__} batch without a predict_step; override "
            "predict_step in your LightningModule (or wrap it in SketchedModule), or use speed='flops'."
        )

    def _speed_batches(self) -> list[Any]:
        """``speed_batches`` batches, read once, already on the device."""
        if self._batches is None:
            loader = self._speed_loader()
            batches = list(itertools.islice(itertools.cycle(iterate(loader)), self.speed_batches))
            if not batches:
                raise ValueError(
                    "speed measurement found no batches in the predict/validation dataloader."
                )
            batches = [self._as_predict_loop_does(b) for b in batches]
            self._batches = [self.trainer.strategy.batch_to_device(b) for b in batches]
        return self._batches

    def _as_predict_loop_does(self, batch: Any) -> Any:
        """``batch`` as Lightning's predict loop has it before the transfer to the device.

        The precision plugin's input conversion (float64 under ``"64-true"``, bfloat16
        under ``"bf16-true"``, ...), then the module's ``on_before_batch_transfer``; the
        strategy's ``batch_to_device`` (and the module's transfer hooks) come next.
        """
        batch = self.trainer.precision_plugin.convert_input(batch)
        return self.pl_module.on_before_batch_transfer(batch, 0)

    def _speed_loader(self) -> Any:
        trainer = self.trainer
        for source in (_datamodule(trainer), self.pl_module):
            if source is not None and is_overridden("predict_dataloader", source):
                return source.predict_dataloader()
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise ValueError("speed='measure' needs a predict or validation dataloader.")
        return loaders

    # -- several processes (DDP) -------------------------------------------------------

    def _mean(self, value: float) -> float:
        if self.trainer.world_size == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.pl_module.device)
        return float(self.trainer.strategy.reduce(tensor, reduce_op="mean"))

    def _broadcast(self, obj: Any) -> Any:
        if self.trainer.world_size == 1:
            return obj
        return self.trainer.strategy.broadcast(obj, src=0)

    @property
    def alone(self) -> bool:
        return self.trainer.world_size == 1

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size == 1:
            return tensor
        result: torch.Tensor = self.trainer.strategy.reduce(
            tensor.to(self.pl_module.device), reduce_op="sum"
        )
        return result.to(tensor.device)

    def announce(self, command: Command) -> None:
        self._broadcast(command)

    def receive(self) -> Command | None:
        result: Command | None = self._broadcast(None)
        return result

    def finish(self) -> None:
        if self.trainer.world_size > 1 and self.trainer.is_global_zero:
            self._broadcast(None)


class _StepOnlyLogs:
    """Notes whether the module logs ``monitor`` per step only, to explain a missing epoch value.

    ``self.log(name, ..., on_step=True, on_epoch=False)`` in ``validation_step`` leaves
    nothing in ``trainer.callback_metrics`` once the loop ends; the call itself is
    the only place that says why. Calls go through unchanged.
    """

    def __init__(self, module: LightningModule, monitor: str) -> None:
        self.module = module
        self.monitor = monitor
        self.seen = False
        self._saved: Any = None

    def __enter__(self) -> _StepOnlyLogs:
        module, bound = self.module, self.module.log
        self._saved = vars(module).get("log")
        signature = inspect.signature(LightningModule.log)

        def log(*args: Any, **kwargs: Any) -> None:
            if (args[0] if args else kwargs.get("name")) == self.monitor:
                given = signature.bind_partial(module, *args, **kwargs).arguments
                if given.get("on_step") and given.get("on_epoch") is False:
                    self.seen = True
            bound(*args, **kwargs)

        module.log = log  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            vars(self.module).pop("log", None)
        else:
            vars(self.module)["log"] = self._saved


def missing_monitor(monitor: str, metrics: Mapping[str, Any], *, step_only: bool) -> str:
    """Why ``monitor`` is not among the validation loop's ``metrics``, and the fix."""
    available = sorted(k for k in metrics if not k.startswith("sketchtune/"))
    if step_only:
        return (
            f"`monitor`={monitor!r} is logged with on_step=True, on_epoch=False, so the "
            f"validation loop keeps no value of it for the epoch (its epoch metrics are "
            f"{available}). Log it per epoch: self.log({monitor!r}, value, on_epoch=True) in "
            "validation_step (add on_step=True to keep the per-batch values too)."
        )
    return (
        f"`monitor`={monitor!r} was not logged by the validation loop; the logged metrics are "
        f"{available}. Log it in validation_step with self.log({monitor!r}, ...) or set "
        "monitor to one of those."
    )


def _datamodule(trainer: Trainer) -> Any:
    return getattr(trainer, "datamodule", None)
