"""One search on a borrowed Trainer: tune, pick the plan, apply it, measure and report it.

The callback's ``_search`` hook calls :func:`run_search` (as Lightning's
``BatchSizeFinder`` calls ``tuner/batch_size_scaling.py``) and keeps what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from sketchtune.lightning._evaluator import LightningEvaluator
from sketchtune.lightning._reporting import (
    Progress,
    TrialLogger,
    count_weights,
    log_outcome,
    summarize,
)
from sketchtune.lightning._trainer_state import TrainerState, has_validation_batches
from sketchtune.lightning.module import SketchedModule
from sketchtune.plan import SketchPlan
from sketchtune.search import OptunaSearch
from sketchtune.tuner import SKAutoTuner

if TYPE_CHECKING:
    import pandas as pd
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
    from torch import nn

    from sketchtune.lightning.callback import SketchTuneCallback
    from sketchtune.results import RunSummary

__all__ = ["SearchResult", "run_search", "tuned_module"]


@dataclass
class SearchResult:
    """What one search found (the callback copies it into its public attributes)."""

    tuner: SKAutoTuner
    search: OptunaSearch
    plan: SketchPlan
    speedup: float | None
    accuracy: float | None
    applied: bool
    results: pd.DataFrame | None
    summary: RunSummary | None
    next_log_step: int


def tuned_module(pl_module: LightningModule) -> nn.Module:
    """The model whose layers the configs name: a SketchedModule's wrapped module, else itself."""
    return pl_module.module if isinstance(pl_module, SketchedModule) else pl_module


def run_search(
    cb: SketchTuneCallback,
    trainer: Trainer,
    pl_module: LightningModule,
    loop: _EvaluationLoop,
    search: OptunaSearch,
    log_step: int,
) -> SearchResult:
    """Run ``cb``'s search with ``trainer``'s loops; apply the plan found if ``cb.apply_best``.

    With ``finetune_steps > 0`` the applied plan is fine-tuned once more, as its
    trial was, and the accuracy returned is that of the model left behind.
    """
    evaluator = LightningEvaluator(
        trainer,
        pl_module,
        loop,
        monitor=cb.monitor,
        speed=cb.speed,
        speed_batches=cb.speed_batches,
        warmup_batches=cb.warmup_batches,
        finetune_steps=cb.finetune_steps,
        metric_range=cb.metric_range,
    )
    tuner = SKAutoTuner(
        tuned_module(pl_module),
        cb.configs,
        evaluator,
        search_algorithm=search,
        accuracy_threshold=cb.accuracy_threshold,
        optimization_eval_func="flops" if cb.speed == "flops" else None,
        max_accuracy_drop=cb.max_accuracy_drop,
        strategy=cb.strategy,
        seed=cb.seed,
        mode=cb.mode,
        default_init=cb.default_init,
    )
    state = TrainerState(trainer, loop)
    loggers = list(trainer.loggers)
    total = cb.n_trials * len(tuner.study_labels)
    progress = Progress(trainer, total) if trainer.is_global_zero else None
    log_trial = TrialLogger(loggers, start=log_step)
    dense_weights = count_weights(pl_module)
    state.detach(hooks=[evaluator.early_stop])
    try:
        if not has_validation_batches(loop):
            raise ValueError(
                "SketchTuneCallback needs validation batches to measure accuracy; give the "
                "Trainer a val_dataloader and limit_val_batches > 0."
            )
        if trainer.is_global_zero:
            callbacks: list[Any] = [log_trial] + ([progress.update] if progress else [])
            tuner.tune(callbacks=callbacks)
        else:
            tuner.follow()
        plan = _agreed_plan(trainer, tuner.best_plan)
        accuracy = tuner.best_accuracy
        throughput = _throughput(tuner)
        if cb.apply_best and plan:
            tuner.apply(plan)  # built as measured (activation statistics included)
            if isinstance(pl_module, SketchedModule):
                pl_module.apply_plan(plan)  # its checkpoints carry the plan too
            if cb.finetune_steps and plan:
                accuracy = _finetune_applied(evaluator, tuner, accuracy)
    finally:
        if progress is not None:
            progress.close()
        state.restore()
    results = summary = None
    if trainer.is_global_zero:
        results = tuner.get_results_dataframe()
        log_outcome(
            tuner,
            search,
            results,
            plan=plan,
            speedup=tuner.best_speedup,
            accuracy=accuracy,
            monitor=cb.monitor,
            storage=cb.storage,
            loggers=loggers,
            step=log_trial.step,
        )
        summary = summarize(
            tuner,
            search,
            results,
            plan=plan,
            accuracy=accuracy,
            monitor=cb.monitor,
            storage=cb.storage,
            dense_weights=dense_weights,
            throughput=throughput,
            output_dir=cb.output_dir,
        )
    return SearchResult(
        tuner=tuner,
        search=search,
        plan=plan,
        speedup=tuner.best_speedup,
        accuracy=accuracy,
        applied=cb.apply_best,
        results=results,
        summary=summary,
        next_log_step=log_trial.step + 1,
    )


def _agreed_plan(trainer: Trainer, plan: SketchPlan | None) -> SketchPlan:
    """Rank 0's plan on every rank (empty when nothing kept the floor)."""
    data = plan.to_dict() if plan is not None else None
    if trainer.world_size > 1:
        data = trainer.strategy.broadcast(data, src=0)
    return SketchPlan.from_dict(data) if data is not None else SketchPlan()


def _throughput(tuner: SKAutoTuner) -> tuple[float | None, float | None]:
    """Dense and tuned throughput from the measurement that confirmed the plan (timed speed only).

    The summary shows the same measurement as ``best_speedup``, not another one.
    """
    confirmation = tuner.confirmation
    if not confirmation:
        return None, None
    return confirmation["dense_throughput"], confirmation["tuned_throughput"]


def _finetune_applied(
    evaluator: LightningEvaluator, tuner: SKAutoTuner, trial_accuracy: float | None
) -> float:
    """Fine-tune the applied plan as its trial was; its accuracy, which is what is reported."""
    accuracy = evaluator.finetune()
    floor = tuner.floor
    if not floor.feasible(accuracy):
        rank_zero_warn(
            f"sketchtune: the chosen plan, fine-tuned again after the search, reached "
            f"{accuracy:.4f} (its trial reached {trial_accuracy}), which misses the floor "
            f"{floor.describe()}. It is kept; fine-tune longer (finetune_steps) or tighten the "
            "floor to leave a margin."
        )
    return accuracy
