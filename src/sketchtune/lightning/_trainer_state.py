"""What the search changes on the Trainer, saved before it and put back after it."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

if TYPE_CHECKING:
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop

__all__ = ["TrainerState", "has_validation_batches"]


class TrainerState:
    """The Trainer's callbacks, loggers, stage, loop state and metrics (as BatchSizeFinder saves them).

    Args:
        trainer: the Trainer the search borrows.
        loop: the validation loop the trials run.
    """

    def __init__(self, trainer: Trainer, loop: _EvaluationLoop) -> None:
        # callbacks/loggers are assignable attributes mypy cannot see
        self.trainer: Any = cast(Any, trainer)
        self.loop = loop
        self.callbacks = list(self.trainer.callbacks)
        self.loggers = list(trainer.loggers)
        self.stage = trainer.state.stage
        self.bar_was_enabled = False
        self.verbose = loop.verbose
        self.loop_state = copy.deepcopy(loop.state_dict())
        self.metrics: list[tuple[dict[str, Any], dict[str, Any]]] = [
            (target, dict(target))
            for target in (
                trainer.callback_metrics,
                trainer.logged_metrics,
                trainer.progress_bar_metrics,
            )
        ]

    def detach(self, hooks: list[Callback]) -> None:
        """Leave only ``hooks`` (and a disabled progress bar) on the Trainer, and no loggers."""
        trainer = self.trainer
        # No checkpoints, early stopping or per-trial validation bars. The progress bar stays
        # registered but disabled: Rich's live display asks the trainer for it while it renders.
        bar = trainer.progress_bar_callback
        self.bar_was_enabled = bar is not None and bar.is_enabled
        if bar is not None:
            bar.disable()
        trainer.callbacks = [*hooks, *([bar] if bar is not None else [])]
        trainer.loggers = []  # trials are logged by the callback, as trials
        self.loop.verbose = False
        trainer.state.stage = RunningStage.VALIDATING

    def restore(self) -> None:
        """Put back everything :meth:`detach` and the trials changed."""
        trainer = self.trainer
        trainer.callbacks = self.callbacks
        if self.bar_was_enabled and trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.enable()
        trainer.loggers = self.loggers
        trainer.state.stage = self.stage
        self.loop.verbose = self.verbose
        self.loop.load_state_dict(copy.deepcopy(self.loop_state))
        self.loop.restarting = False
        if trainer.state.fn == TrainerFn.VALIDATING:
            self.loop.reset()  # the validate() that called us goes on with a fresh iterator
        for target, saved in self.metrics:
            target.clear()
            target.update(saved)


def has_validation_batches(loop: _EvaluationLoop) -> bool:
    """Whether ``loop`` has batches to validate on (it sets up its dataloaders to find out)."""
    loop.setup_data()
    return not loop.skip


def check_launcher(trainer: Trainer) -> None:
    """Refuse strategies that run the search in child processes whose result never comes back.

    Spawn-based launchers (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``, XLA)
    return only the weights of rank 0 to the main process, loaded non-strictly:
    the main process would keep a dense model whose sketched layers' weights
    were dropped, and no plan.
    """
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        raise ValueError(
            f"SketchTuneCallback cannot search under the {type(trainer.strategy).__name__} "
            f"strategy with its {type(launcher).__name__.lstrip('_')}: it runs the search in child "
            "processes and hands only rank 0's weights back to the main process, so the main "
            "process would get no plan and a dense model that lost the sketched layers' weights. "
            "Use strategy='ddp' (every process runs your script), a single device, or launch "
            "with torchrun."
        )
