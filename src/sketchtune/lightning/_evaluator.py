"""The Trainer as the tuner's evaluator: its validation loop judges accuracy, a timed predict loop speed.

Everything here runs while the search holds the trainer (see ``_TrainerState``
in ``callback.py``): the user's callbacks and loggers are detached, so trials
never write checkpoints, log to the user's loggers or draw progress bars.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import optuna
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from sketchtune._modes import eval_mode, restore_modes, save_modes
from sketchtune.evaluate import (
    AccuracyFloor,
    Command,
    Evaluator,
    FloorUnreachable,
    RemoteTrial,
    as_metric,
)
from sketchtune.lightning._early_stop import EarlyStop, batch_size
from sketchtune.measure import synchronize
from sketchtune.registry import is_sketched

if TYPE_CHECKING:
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop


class LightningEvaluator(Evaluator):
    """Accuracy from the Trainer's validation loop, speed from timed ``predict_step`` calls."""

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
        self._samples = 0
        self._train_iter: Iterator[Any] | None = None

    # -- accuracy ----------------------------------------------------------------------

    def accuracy(
        self, model: nn.Module, *, trial: optuna.Trial | RemoteTrial | None, floor: AccuracyFloor
    ) -> float:
        if trial is None or self.finetune_steps == 0:
            return self._validate(floor)
        # Per-trial fine-tuning: report the zero-shot, half-way and final accuracy to the pruner.
        checkpoints = sorted({0, self.finetune_steps // 2, self.finetune_steps})
        done = 0
        value = math.nan
        for step in checkpoints:
            if step > done:
                self._finetune(step - done)
                done = step
            value = self._validate(floor if step == self.finetune_steps else AccuracyFloor(None))
            prune = False
            if isinstance(trial, optuna.Trial):
                trial.report(value, step)
                prune = trial.should_prune()
            if self._broadcast(prune):
                raise optuna.TrialPruned(f"pruned after {step} fine-tuning steps at {value:.4g}")
        return value

    def _validate(self, floor: AccuracyFloor) -> float:
        trainer = self.trainer
        self.early_stop.arm(floor)
        trainer.callback_metrics.pop(self.monitor, None)
        self.loop.run()
        if self.early_stop.bound is not None:
            raise FloorUnreachable(self.early_stop.bound)
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            available = sorted(k for k in metrics if not k.startswith("sketchtune/"))
            raise ValueError(
                f"`monitor`={self.monitor!r} was not logged by the validation loop; the logged "
                f"metrics are {available}. Log it in validation_step with "
                f"self.log({self.monitor!r}, ...) or set monitor to one of those."
            )
        value = as_metric(metrics[self.monitor], f"the monitored metric {self.monitor!r}")
        return self._mean(value)

    # -- fine-tuning -------------------------------------------------------------------

    def _finetune(self, steps: int) -> None:
        """``steps`` optimizer steps on the sketched layers only, with the user's training_step."""
        module = self.pl_module
        sketched = [m for m in module.modules() if is_sketched(m)]
        trainable = {id(p) for m in sketched for p in m.parameters()}
        frozen = [p for p in module.parameters() if id(p) not in trainable and p.requires_grad]
        modes = save_modes(module)
        optimizer = _first_optimizer(module.configure_optimizers())
        # training_step may self.log(); outside the Trainer's loops that would raise, and
        # a trial's training curves are not the user's, so logging is silenced here.
        saved_log = module.__dict__.get("log"), module.__dict__.get("log_dict")
        module.log = _ignore  # type: ignore[method-assign]
        module.log_dict = _ignore  # type: ignore[method-assign]
        try:
            for p in frozen:
                p.requires_grad_(False)
            module.eval()
            for m in sketched:
                m.train()
            with torch.enable_grad(), torch.inference_mode(False):
                for step in range(steps):
                    batch = self.trainer.strategy.batch_to_device(next(self._training_batches()))
                    with self.trainer.precision_plugin.train_step_context():
                        out = module.training_step(batch, step)
                    loss = out["loss"] if isinstance(out, dict) else out
                    if not isinstance(loss, torch.Tensor):
                        raise TypeError(
                            "finetune_steps needs training_step to return the loss (a tensor or a "
                            f"dict with 'loss'), got {type(out).__name__}."
                        )
                    loss.backward()
                    if self.trainer.world_size > 1:
                        for p in (p for m in sketched for p in m.parameters()):
                            if p.grad is not None:
                                p.grad = self.trainer.strategy.reduce(p.grad, reduce_op="mean")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            restore_modes(modes)
            for name, value in zip(("log", "log_dict"), saved_log, strict=True):
                if value is None:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = value

    def _training_batches(self) -> Iterator[Any]:
        if self._train_iter is None:
            loader = self.trainer.train_dataloader
            if loader is None:
                source = (
                    _datamodule(self.trainer)
                    if _datamodule(self.trainer) is not None
                    else self.pl_module
                )
                if not is_overridden("train_dataloader", source):
                    raise ValueError(
                        "finetune_steps > 0 needs training data: give the Trainer a datamodule or "
                        "module with train_dataloader(), or set finetune_steps=0."
                    )
                loader = source.train_dataloader()
            self._train_iter = itertools.cycle(_iterate(loader))
        return self._train_iter

    # -- speed -------------------------------------------------------------------------

    def throughput(self, model: nn.Module) -> float:
        batches = self._speed_batches()
        module = self.pl_module
        device = module.device
        with (
            eval_mode(module),
            torch.inference_mode(),
            self.trainer.precision_plugin.predict_step_context(),
        ):
            for i, batch in enumerate(batches[: self.warmup_batches]):
                self._predict(batch, i)
            synchronize(device)
            start = time.perf_counter()
            for i, batch in enumerate(batches[self.warmup_batches :]):
                self._predict(batch, i)
            synchronize(device)
            elapsed = time.perf_counter() - start
        return self._mean(self._samples / max(elapsed, 1e-9))

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
        """``warmup_batches + speed_batches`` batches, read once, already on the device."""
        if self._batches is None:
            loader = self._speed_loader()
            wanted = self.warmup_batches + self.speed_batches
            batches = list(itertools.islice(itertools.cycle(_iterate(loader)), wanted))
            if not batches:
                raise ValueError(
                    "speed measurement found no batches in the predict/validation dataloader."
                )
            self._batches = [self.trainer.strategy.batch_to_device(b) for b in batches]
            self._samples = sum(batch_size(b) for b in self._batches[self.warmup_batches :])
        return self._batches

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


def _datamodule(trainer: Trainer) -> Any:
    return getattr(trainer, "datamodule", None)


def _iterate(loader: Any) -> Iterator[Any]:
    """Batches of a DataLoader, or of the first of a list/dict of them."""
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()))
    return iter(loader)


def _first_optimizer(config: Any) -> torch.optim.Optimizer:
    """The first optimizer of whatever ``configure_optimizers`` returned."""
    if isinstance(config, torch.optim.Optimizer):
        return config
    if isinstance(config, dict):
        return _first_optimizer(config.get("optimizer"))
    if isinstance(config, (list, tuple)) and config:
        return _first_optimizer(config[0])
    raise TypeError(
        "finetune_steps > 0 needs configure_optimizers to return an optimizer (or a list/dict "
        f"holding one), got {type(config).__name__}."
    )


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
