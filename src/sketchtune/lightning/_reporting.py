"""What the search tells the user: per-trial logger rows, a progress bar, the run's summary."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from sketchtune._atomic import write_text_atomic
from sketchtune._search._confirm import busy_mark, others_share_of
from sketchtune._search._events import Listener, Phase
from sketchtune.plan import SketchPlan
from sketchtune.results import (
    KeptMark,
    RunSummary,
    TimingSetup,
    TrialRecord,
    results_table,
    write_report,
)
from sketchtune.search import OptunaSearch, redact

if TYPE_CHECKING:
    import pandas as pd
    from lightning.pytorch.loggers import Logger

    from sketchtune.tuner import SKAutoTuner

__all__ = [
    "Progress",
    "TrialLogger",
    "count_weights",
    "log_outcome",
    "log_test_metrics",
    "summarize",
]


class TrialLogger:
    """Sends each trial's results to the Trainer's loggers, all at the Trainer's current step.

    The search happens between two training steps, so its rows are logged at the
    step it happened at (``step``, the Trainer's global step): a logger's step never
    goes backwards, neither during the search nor when training goes on afterwards on
    the same Trainer. Each row carries ``sketchtune/trial``, the trial's number as the
    log shows it (1-based), to plot the trials against.

    Args:
        loggers: the Trainer's loggers.
        step: the Trainer's global step.
    """

    def __init__(self, loggers: list[Logger], step: int) -> None:
        self.loggers = loggers
        self.step = step
        self.trials = 0

    def __call__(self, record: TrialRecord) -> None:
        metrics: dict[str, float] = {
            "sketchtune/trial": float(record.trial + 1),
            "sketchtune/feasible": float(record.feasible),
        }
        if record.accuracy is not None:
            metrics["sketchtune/accuracy"] = float(record.accuracy)
        if record.speedup is not None:
            metrics["sketchtune/speedup"] = float(record.speedup)
        for name, value in record.params.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"sketchtune/params/{name}"] = float(value)
        if record.confirmed:
            metrics["sketchtune/confirmed"] = 1.0
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step)
        self.trials += 1


class Progress(Listener):
    """The search's progress in the Trainer's style, phase by phase.

    With Lightning's TQDM bar, each phase (baseline, planner, trials, confirmation)
    gets a tqdm bar of its own, with its count, pace and ETA; the trials' bar also
    shows the best confirmed speedup. With another bar (Rich, whose live display
    prints log lines above itself) each trial is a log line; with bars off, each
    phase is one log line when it ends. The search's notes (a reused study, a
    changed floor, ...) are always logged.
    """

    def __init__(self, trainer: Trainer, total: int) -> None:
        from lightning.pytorch.callbacks import TQDMProgressBar

        self.total = total
        self.best = -math.inf
        self.feasible = 0
        self.done = 0
        self.bar: Any = None
        bar = trainer.progress_bar_callback
        self.bars = isinstance(bar, TQDMProgressBar)
        self.lines = bar is not None and not self.bars

    @override
    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"sketchtune: {text}")
        else:
            rank_zero_info(f"sketchtune: {text}")

    @override
    def phase_start(self, phase: Phase) -> None:
        if not self.bars:
            return
        from tqdm.auto import tqdm

        total = self.total if phase.name == "trials" and not phase.total else phase.total
        self.bar = tqdm(
            total=total,
            desc=f"sketchtune {phase.name}",
            unit=phase.unit,
            dynamic_ncols=True,
            leave=True,
        )

    @override
    def phase_advance(self, phase: Phase) -> None:
        if self.bar is not None and phase.name != "trials":  # trials advance in update()
            self.bar.update(phase.done - self.bar.n)

    @override
    def phase_end(self, phase: Phase) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif not self.lines:
            rank_zero_info(f"sketchtune: {phase.describe()}")

    @override
    def trial(self, record: TrialRecord) -> None:
        self.update(record)

    def update(self, record: TrialRecord) -> None:
        """Count ``record`` and show the best speedup so far: a confirmed one when timed."""
        self.done += 1
        if record.feasible:
            self.feasible += 1
            # a timed trial counts once its rounds confirm it (FLOP figures need no confirming)
            if record.speedup is not None and (record.confirmed or not record.rounds):
                self.best = max(self.best, record.speedup)
        best = f"{self.best:.2f}x" if self.best > -math.inf else "-"
        # a trial timed while other processes took the CPUs: its figure is a busy machine's
        busy = busy_mark(record.rounds)
        if self.bar is not None:
            postfix = {"best": best, "feasible": f"{self.feasible}/{self.done}"}
            if busy:
                postfix["busy"] = f"{others_share_of(record.rounds):.0%}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif self.lines:
            accuracy = "-" if record.accuracy is None else f"{record.accuracy:.4f}"
            rank_zero_info(
                f"sketchtune trial {self.done}/{self.total}: accuracy {accuracy}, "
                f"{'feasible' if record.feasible else 'infeasible'}; best confirmed {best}, "
                f"feasible {self.feasible}/{self.done}" + (f"; {busy}" if busy else "")
            )

    def close(self) -> None:
        """Close the tqdm bar, if one is open."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def count_weights(module: nn.Module) -> int:
    """Parameters and buffers: what the model stores."""
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def log_outcome(
    tuner: SKAutoTuner,
    search: OptunaSearch,
    results: pd.DataFrame,
    *,
    plan: SketchPlan,
    speedup: float | None,
    accuracy: float | None,
    monitor: str,
    storage: Any,
    loggers: list[Logger],
    step: int,
) -> None:
    """One log line with the outcome; the summary metrics, plan and trials table to each logger.

    ``sketchtune_trials.csv`` is the table ``results.csv`` holds (:func:`results_table`).
    """
    feasible = int(results.feasible.sum()) if len(results) else 0
    where = redact(search.storage) if storage is not None else "memory (this callback)"
    floor = tuner.floor.describe()
    if plan:
        shown = f"{speedup:.2f}x" if speedup is not None else "n/a"
        rank_zero_info(
            f"sketchtune: best plan sketches {len(plan)} layer(s): speedup {shown} at "
            f"{monitor}={accuracy:.4f} (dense {tuner.dense_accuracy:.4f}, floor {floor}); "
            f"{feasible}/{len(results)} trials feasible; study {search.study_name!r} in {where}."
        )
    else:
        rank_zero_info(
            f"sketchtune: nothing was kept: {tuner.verdict or 'the model stays dense.'} "
            f"{feasible}/{len(results)} trials feasible (floor {floor}); study "
            f"{search.study_name!r} in {where}."
        )
    summary = {
        "sketchtune/dense_accuracy": tuner.dense_accuracy,
        "sketchtune/best_accuracy": accuracy,
        "sketchtune/best_speedup": speedup,
        "sketchtune/layers_sketched": float(len(plan)),
    }
    metrics = {k: float(v) for k, v in summary.items() if v is not None}
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        log_dir = getattr(logger, "log_dir", None)
        if isinstance(log_dir, str):
            path = os.path.join(log_dir, "sketchtune_plan.json")
            try:
                os.makedirs(log_dir, exist_ok=True)
                plan.save(path)
                path = os.path.join(log_dir, "sketchtune_trials.csv")
                write_text_atomic(path, trials_csv(tuner))
            except OSError as exc:  # e.g. a full disk: the result is kept, the file is not
                report_unwritten(path, exc)
        logger.save()


def kept_mark(tuner: SKAutoTuner) -> KeptMark | None:
    """The kept plan as every output marks it: from the tuner's decision and study record."""
    return KeptMark.of(tuner.decision, tuner.records, tuner.kept)


def trials_csv(tuner: SKAutoTuner) -> str:
    """``results.csv``'s table, as text."""
    return str(results_table(tuner.records, kept_mark(tuner)).to_csv(index=False))


def log_test_metrics(
    dense: dict[str, float] | None,
    tuned: dict[str, float] | None,
    *,
    loggers: list[Logger],
    step: int,
) -> None:
    """One line with the dense and tuned models' test metrics; both to each logger.

    The search picks its plan on the validation split, which flatters it; the test
    split is the honest figure. Nothing happens without test batches.
    """
    if dense is None or tuned is None:
        return
    shown = ", ".join(
        f"{name} {dense[name]:.4f} -> {tuned.get(name, math.nan):.4f}" for name in sorted(dense)
    )
    rank_zero_info(f"sketchtune: held-out test split, dense -> tuned: {shown}")
    metrics = {f"sketchtune/dense_{name}": value for name, value in dense.items()}
    metrics.update({f"sketchtune/tuned_{name}": value for name, value in tuned.items()})
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def summarize(
    tuner: SKAutoTuner,
    search: OptunaSearch,
    results: pd.DataFrame,
    *,
    plan: SketchPlan,
    accuracy: float | None,
    monitor: str,
    storage: Any,
    dense_weights: int,
    throughput: tuple[float | None, float | None],
    output_dir: str | os.PathLike[str] | None,
    timing: TimingSetup | None = None,
) -> RunSummary:
    """The dense-vs-tuned table, logged, and written to ``output_dir`` with the plots.

    The log shows what ``summary.md`` holds (the table, how the speedup was measured
    with ``timing``, the kept trial), less its notes on Optuna's and the dashboard's views.
    """
    summary = RunSummary(
        monitor=monitor,
        floor=tuner.floor.describe(),
        dense_accuracy=tuner.dense_accuracy,
        tuned_accuracy=accuracy if plan else tuner.dense_accuracy,
        dense_throughput=throughput[0],
        tuned_throughput=throughput[1],
        dense_weights=dense_weights,
        tuned_weights=count_weights(tuner.model),
        plan=plan,
        trials=len(results),
        feasible=int(results.feasible.sum()) if len(results) else 0,
        storage=storage if isinstance(storage, str) else None,
        study_name=search.study_name,
        # the same figure as best_speedup: the median of the confirmation's per-round ratios
        confirmed_speedup=tuner.best_speedup if plan and tuner.confirmation else None,
        verdict=tuner.verdict,
        kept=kept_mark(tuner),
        timing=timing,
        speed_model=None if tuner.kept is None else tuner.kept.speed_model,
    )
    # the log shows summary.md less its notes on Optuna's and the dashboard's views
    text = "sketchtune: dense vs tuned\n" + summary.markdown(notes=False)
    if output_dir is not None:
        try:
            paths = write_report(output_dir, summary, tuner.records, floor=tuner.floor.value)
        except OSError as exc:  # e.g. a full disk: the result is kept, the report is not
            report_unwritten(os.fspath(output_dir), exc)
        else:
            text += "\nWrote " + ", ".join(sorted(paths.values()))
    rank_zero_info(text)
    return summary


def report_unwritten(path: str, exc: OSError) -> None:
    """One warning: ``path`` could not be written (and why); the result itself is kept."""
    # os.replace names the temporary file first and the target second
    where = exc.filename2 or exc.filename or path
    rank_zero_warn(
        f"sketchtune: could not write {os.fspath(where)!r} ({exc.strerror or exc}). The result "
        "is kept: the plan is in the model and in the callback (best_plan, applied_plan, "
        "summary), and checkpoints carry it. Free space or fix the folder, then save the plan "
        "with callback.best_plan.save(path) if you need the file."
    )
