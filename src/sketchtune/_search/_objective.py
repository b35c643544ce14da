"""The Optuna objective of one study, its per-trial report line, and the search's signal handling."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sketchtune._memory import release_freed_memory
from sketchtune._search._best import BestTracker, score_text
from sketchtune._search._confirm import busy_mark
from sketchtune._search._events import Events
from sketchtune._search._judge import Judge, Outcome, TrialFailed
from sketchtune._search._studies import StudyLayout, StudySpec
from sketchtune._search._trialinfo import (
    TrialInfo,
    constraint_of,
    finished_twin,
    frozen_params_key,
    set_constraint,
)
from sketchtune.results import TrialRecord, record_from_trial
from sketchtune.search import OptunaSearch, redact

__all__ = [
    "WORKER",
    "OverBudget",
    "make_objective",
    "make_reporter",
    "quiet_optuna",
    "resume_hint",
    "run_study",
    "sigterm_as_interrupt",
    "warm_start",
]

log = logging.getLogger("sketchtune")

#: which process ran a trial (several may share a study)
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class OverBudget(Exception):
    """Another worker took the last slot of the budget first; this trial is not run."""


def warm_start(
    search: OptunaSearch, layout: StudyLayout, studies: Mapping[str, optuna.Study]
) -> None:
    """Queue the most accurate plan first in every new study (default sampler only).

    The sampler then learns early where the floor lies, and that plan's speed
    is the one to beat.
    """
    if not search.uses_default_sampler:
        return
    for spec in layout.specs:
        study = studies[spec.label]
        if not study.get_trials(deepcopy=False):
            study.enqueue_trial(layout.most_accurate_params(spec))


def run_study(
    spec: StudySpec,
    study: optuna.Study,
    layout: StudyLayout,
    judge: Judge,
    search: OptunaSearch,
    best: BestTracker,
    *,
    dense_accuracy: float | None,
    deadline: float | None,
    events: Events,
) -> None:
    """Run ``spec``'s study until its budget (or the deadline) is used up."""
    search.set_current(study)  # the study being tuned, as in the seed
    best.consider_study(spec.label, study)
    search.run(
        study,
        make_objective(spec, layout, judge, search, dense_accuracy, best),
        deadline=deadline,
        catch=(TrialFailed, OverBudget),
        after_trial=make_reporter(spec, best, judge, n_trials=search.n_trials, events=events),
    )


def make_objective(
    spec: StudySpec,
    layout: StudyLayout,
    judge: Judge,
    search: OptunaSearch,
    dense_accuracy: float | None,
    best: BestTracker,
) -> Callable[[optuna.Trial], float]:
    """The objective of ``spec``'s study: suggest a plan, judge it, record it, return its value.

    A plan that looks faster than the study's best confirmed speedup is timed on until
    its own figure is confirmed (or falls back), so the value told to Optuna for a
    new best is a confirmed one.
    """

    def objective(trial: optuna.Trial) -> float:
        if search.over_budget(trial):
            TrialInfo(skipped="the study's budget was used up by other workers").write(trial)
            raise OverBudget
        plan = layout.suggest(spec, trial)
        twin = finished_twin(trial, search.snapshot) or _await_running_twin(trial, search)
        if twin is not None and not _judged_alike(twin, judge):
            twin = None  # judged against another floor: measure it again against today's
        if twin is not None:
            dataclasses.replace(TrialInfo.of(twin), duplicate_of=twin.number, worker=WORKER).write(
                trial
            )
            twin_info = TrialInfo.of(twin)
            if twin_info.accuracy is not None and not twin_info.early_stop:
                set_constraint(trial, judge.floor.violation(twin_info.accuracy))  # today's floor
            else:
                set_constraint(trial, constraint_of(twin))
            assert twin.value is not None
            return twin.value
        info = TrialInfo(plan=plan.to_dict()["layers"], worker=WORKER)
        outcome: Outcome
        try:
            if not plan and dense_accuracy is not None:
                # every layer left dense: that is the baseline, already measured
                outcome = judge.dense_outcome(dense_accuracy)
            else:
                outcome = judge.evaluate(plan, trial, beat=best.beat(spec.label))
        except TrialFailed as exc:
            dataclasses.replace(info, reason=str(exc)).write(trial)
            raise
        info = dataclasses.replace(
            info,
            accuracy=outcome.accuracy,
            speed=outcome.speed,
            speedup=outcome.speedup,
            feasible=outcome.feasible,
            flops_speedup=outcome.flops_speedup,
            early_stop=outcome.early_stop,
            run=judge.run_id if outcome.speed_measured else None,
        )
        if outcome.timing is not None:
            low, high = outcome.timing.interval
            info = dataclasses.replace(
                info,
                rounds=outcome.timing.rounds_list(),
                confirmed=outcome.timing.confirmed,
                lower=low,
                upper=high,
            )
        info.write(trial)
        set_constraint(trial, outcome.violation)
        return outcome.value(judge.mode)

    return objective


def _judged_alike(twin: FrozenTrial, judge: Judge) -> bool:
    """Whether ``twin``'s stored verdict still holds against today's floor."""
    info = TrialInfo.of(twin)
    if info.accuracy is None or info.early_stop:
        return True
    return judge.floor.feasible(info.accuracy) == bool(info.feasible)


def _await_running_twin(trial: optuna.Trial, search: OptunaSearch) -> FrozenTrial | None:
    """Another worker's RUNNING trial with the same parameters, once it has finished.

    Workers sharing a study may be asked for the same parameters at once; rather
    than measuring them twice, the later trial waits for the earlier one (as long
    as the storage's heartbeat would keep a live trial alive) and reuses its result.
    Returns ``None`` when there is no such trial, or it did not complete.
    """
    if search.storage is None:
        return None  # one process per in-memory study
    key = frozen_params_key(trial.params)
    running = [
        t.number
        for t in search.snapshot
        if t.state == TrialState.RUNNING
        and t.number < trial.number
        and frozen_params_key(t.params) == key
    ]
    if not running:
        return None
    wait = float(search.grace_period or 2 * (search.heartbeat_interval or 10)) * 3
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for other in trial.study.get_trials(deepcopy=False):
            if other.number in running and other.state != TrialState.RUNNING:
                return finished_twin(trial, [other])
        time.sleep(0.2)
    return None


def make_reporter(
    spec: StudySpec,
    best: BestTracker,
    judge: Judge,
    *,
    n_trials: int | None,
    events: Events,
) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Optuna's after-trial callback: keep the best, tell ``events`` (the trial, one line)."""

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        info = TrialInfo.of(trial)
        if info.skipped is not None:
            return
        record = record_from_trial(spec.label, trial, judge.floor)
        best.consider(spec.label, record)
        release_freed_memory(share=0.02)  # the trial's modules and temporaries
        events.trial(record)
        events.advance(unit="trial")
        events.say(_trial_line(spec, record, info, best, judge, n_trials))

    return after_trial


def _trial_line(
    spec: StudySpec,
    record: TrialRecord,
    info: TrialInfo,
    best: BestTracker,
    judge: Judge,
    n_trials: int | None,
) -> str:
    params = " ".join(f"{k}={v}" for k, v in record.params.items())
    if record.state != "COMPLETE":
        outcome = record.state.lower() + (f" ({record.reason})" if record.reason else "")
    else:
        accuracy = f"accuracy {record.accuracy:.4f} ({judge.floor.describe()})"
        if not record.feasible:
            outcome = f"{accuracy} -> infeasible"
        elif record.speedup is not None:
            outcome = f"{accuracy}, speedup {record.speedup:.2f}x"
            if record.rounds:
                confirmed = ", confirmed" if record.confirmed else ""
                mark = busy_mark(record.rounds)
                outcome += f" ({len(record.rounds)} rounds{confirmed}{', ' + mark if mark else ''})"
            elif judge.speed_model == "flops":
                outcome += " (FLOP model)"
        else:
            outcome = accuracy
        if info.duplicate_of is not None:
            outcome += f" (same as trial {info.duplicate_of + 1})"
    line = f"[{spec.label}] trial {record.trial + 1}/{n_trials or '-'}: {params} -> {outcome}"
    return line + best_text(spec.label, best, judge)


def best_text(label: str, best: BestTracker, judge: Judge) -> str:
    """`` | best ...``: the best confirmed figure, or the best so far marked unconfirmed."""
    leader = best.best(label)
    if leader is not None:
        confirmed = best.timed
        return f" | best {score_text(leader, confirmed=confirmed)} (trial {leader.trial + 1})"
    candidate = best.leaders().get(label)
    if candidate is None or candidate.speedup is None:
        return ""
    return f" | best so far {candidate.speedup:.2f}x (unconfirmed, trial {candidate.trial + 1})"


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (a scheduler stopping the job, ``kill``) into Ctrl-C for the search's duration.

    The search then ends the way Ctrl-C ends it: the running trial is failed,
    the model is restored, finished trials stay in the study.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _DropOurFailures(logging.Filter):
    """Optuna logs every failed trial with a traceback; ours carry a recorded reason instead.

    Optuna follows the traceback with a second line, "Trial N failed with value None.",
    which carries no exception: it is dropped for the trials whose first line was.
    """

    def __init__(self) -> None:
        super().__init__()
        self._dropped: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        trial = message.split(" failed with ", 1)[0]  # "Trial 12"
        if isinstance(exc, (TrialFailed, OverBudget)):
            self._dropped.add(trial)
            return False
        if message.startswith(f"{trial} failed with value ") and trial in self._dropped:
            self._dropped.discard(trial)
            return False
        return True


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's per-trial INFO lines (the tuner reports trials itself) for the duration."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # a logger's filters see only the records made on it: failed trials are logged by
    # optuna.study._optimize, so the filter goes there (and on optuna's own logger)
    loggers = [logging.getLogger("optuna"), logging.getLogger("optuna.study._optimize")]
    filt = _DropOurFailures()
    for logger in loggers:
        logger.addFilter(filt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(filt)
        optuna.logging.set_verbosity(verbosity)


def resume_hint(search: OptunaSearch) -> str:
    """What an interrupted search kept, and how to continue it."""
    kept = sum(search.counted_trials(s) for s in search.studies.values())
    if search.storage is None:
        where = "in memory (tuner.search_algorithm.studies); pass a storage URL to resume in a later run"
    else:
        where = (
            f"in {redact(search.storage)!r}; run again with the same storage, "
            f"study_name={search.study_name!r} and load_if_exists=True to resume"
        )
    return f"interrupted: the model is restored and {kept} finished trial(s) are kept {where}."
