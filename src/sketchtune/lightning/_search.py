"""One search on a borrowed Trainer: tune, pick the plan, apply it, measure and report it.

The callback's ``_search`` hook calls :func:`run_search` (as Lightning's
``BatchSizeFinder`` calls ``tuner/batch_size_scaling.py``) and keeps what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from sketchtune.lightning._evaluator import LightningEvaluator
from sketchtune.lightning._reporting import (
    Progress,
    TrialLogger,
    count_weights,
    log_outcome,
    log_test_metrics,
    summarize,
)
from sketchtune.lightning._trainer_state import TrainerState, has_validation_batches
from sketchtune.lightning.module import SketchedModule
from sketchtune.plan import SketchPlan, Swap
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
    #: the test loop's metrics of the dense and of the tuned model (None without test batches)
    dense_test: dict[str, float] | None = None
    tuned_test: dict[str, float] | None = None


def tuned_module(pl_module: LightningModule) -> nn.Module:
    """The model whose layers the configs name: a SketchedModule's wrapped module, else itself."""
    return pl_module.module if isinstance(pl_module, SketchedModule) else pl_module


def run_search(
    cb: SketchTuneCallback,
    trainer: Trainer,
    pl_module: LightningModule,
    loop: _EvaluationLoop,
    search: OptunaSearch,
    keep: Callable[[SearchResult], None],
) -> SearchResult:
    """Run ``cb``'s search with ``trainer``'s loops; apply the plan found if ``cb.apply_best``.

    With ``finetune_steps > 0`` the applied plan is fine-tuned once more, as its
    trial was, and the accuracy returned is that of the model left behind.
    ``keep`` receives the result as soon as the plan is in the model and again
    before any report file is written, so a failure after that (a full disk)
    never leaves a sketched model whose callback does not know its plan; a report
    that cannot be written is a warning.
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
    log_trial = TrialLogger(loggers, step=trainer.global_step)
    dense_weights = count_weights(pl_module)
    plan: SketchPlan = SketchPlan()
    accuracy: float | None = None

    def result(
        results: pd.DataFrame | None = None,
        dense_test: dict[str, float] | None = None,
        tuned_test: dict[str, float] | None = None,
    ) -> SearchResult:
        return SearchResult(
            tuner=tuner,
            search=search,
            plan=plan,
            speedup=tuner.best_speedup,
            accuracy=accuracy,
            applied=cb.apply_best,
            results=results,
            summary=None,
            dense_test=dense_test,
            tuned_test=tuned_test,
        )

    state.detach(hooks=[evaluator.early_stop])
    try:
        if not has_validation_batches(loop):
            raise ValueError(
                "SketchTuneCallback needs validation batches to measure accuracy; give the "
                "Trainer a val_dataloader and limit_val_batches > 0."
            )
        if trainer.is_global_zero:
            tuner.tune(callbacks=[log_trial], listeners=[progress] if progress else [])
        else:
            tuner.follow()
        plan = _agreed_plan(trainer, tuner.best_plan)
        accuracy = tuner.best_accuracy
        throughput = _throughput(tuner)
        # held-out figures: the search selected on the validation split, so it flatters the plan
        dense_test = tuned_test = test_metrics(trainer)
        if cb.apply_best and plan:
            tuner.apply(plan)  # built as measured (activation statistics included)
            if isinstance(pl_module, SketchedModule):
                pl_module.apply_plan(plan)  # its checkpoints carry the plan too
            keep(result())  # the model holds the plan: so does the callback, whatever follows
            if cb.finetune_steps and plan:
                accuracy = _finetune_applied(evaluator, tuner, accuracy)
        if dense_test is not None and plan:
            if cb.apply_best:
                tuned_test = test_metrics(trainer)
            else:
                with Swap(tuner.model, tuner.build(plan)):
                    tuned_test = test_metrics(trainer)
    finally:
        if progress is not None:
            progress.close()
        state.restore()
    found = result(
        results=tuner.get_results_dataframe() if trainer.is_global_zero else None,
        dense_test=dense_test,
        tuned_test=tuned_test,
    )
    keep(found)  # before any file is written
    if trainer.is_global_zero:
        results = found.results
        assert results is not None
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
        found.summary = summarize(
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
            timing=evaluator.timing_setup(),
        )
        log_test_metrics(dense_test, tuned_test, loggers=loggers, step=log_trial.step)
    return found


def test_metrics(trainer: Trainer) -> dict[str, float] | None:
    """What ``test_step`` logs over the test dataloader for the model as it is now.

    ``None`` when there are no test batches (no ``test_dataloader`` or ``test_step``,
    or ``limit_test_batches=0``). Runs the Trainer's own test loop, quietly; the
    caller's ``TrainerState`` puts the metrics back afterwards.
    """
    holders = (getattr(trainer, "datamodule", None), trainer.lightning_module)
    if not any(h is not None and is_overridden("test_dataloader", h) for h in holders):
        return None
    loop = trainer.test_loop
    fn, stage, verbose = trainer.state.fn, trainer.state.stage, loop.verbose
    # as trainer.test() runs: test_step's self.log then goes to the test loop's results
    trainer.state.fn, trainer.state.stage = TrainerFn.TESTING, RunningStage.TESTING
    loop.verbose = False
    try:
        loop.setup_data()
        if loop.skip:
            return None
        outputs = loop.run()
    finally:
        trainer.state.fn, trainer.state.stage = fn, stage
        loop.verbose = verbose
    merged: dict[str, float] = {}
    for logged in outputs:
        merged.update({name: float(value) for name, value in logged.items()})
    return merged


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
