"""Running a planned study: the planner's proposals as real trials, then the sampler."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from sketchtune._planner._driver import TAG, Planner
from sketchtune._search._best import BestTracker
from sketchtune._search._builder import PlanBuilder
from sketchtune._search._events import Events
from sketchtune._search._judge import Judge, TrialFailed
from sketchtune._search._objective import WORKER, OverBudget, make_objective, make_reporter
from sketchtune._search._studies import StudyLayout, StudySpec
from sketchtune.search import OptunaSearch

__all__ = ["ENQUEUED_BY", "run_planned_study"]

#: trial user attribute: the process that enqueued a planner proposal
ENQUEUED_BY = "sketchtune:enqueued_by"


def run_planned_study(
    spec: StudySpec,
    study: optuna.Study,
    layout: StudyLayout,
    judge: Judge,
    builder: PlanBuilder,
    search: OptunaSearch,
    best: BestTracker,
    *,
    seed: int,
    dense_accuracy: float | None,
    deadline: float | None,
    events: Events,
) -> Planner | None:
    """Run ``spec``'s study: the planner's proposals first, then (if any budget is left) the sampler.

    A ``GridSampler`` is an explicit enumeration: it runs as given, without the planner.

    Returns the planner (its options, frontier and timings), ``None`` for a grid.
    """
    search.set_current(study)
    best.consider_study(spec.label, study)
    catch = (TrialFailed, OverBudget)
    objective = make_objective(spec, layout, judge, search, dense_accuracy, best)
    reporter = make_reporter(spec, best, judge, n_trials=search.n_trials, events=events)
    if isinstance(search.sampler, optuna.samplers.GridSampler):
        with events.phase("trials", search.remaining(study.get_trials(deepcopy=False)), "trial"):
            search.run(study, objective, deadline=deadline, catch=catch, after_trial=reporter)
        return None
    with events.phase("planner", len(spec.groups), "layer"):
        planner = Planner.for_study(
            spec,
            study,
            layout,
            judge,
            builder,
            seed=seed,
            refine=search.uses_default_sampler,
            progress=lambda: events.advance(unit="layer"),
        )
    source = (
        "stored in the study" if planner.loaded else f"prepared in {planner.prepare_seconds:.2f} s"
    )
    estimated = sum(o.estimated for o in planner.options)
    if estimated:
        source += (
            f"; {estimated} group(s) timed unsteadily twice, priced from multiply-adds at the "
            "others' seconds per multiply-add"
        )
    events.say(
        f"[{spec.label}] planner: {len(planner.options)} layer group(s), "
        f"{sum(len(o.candidates) for o in planner.options)} candidates ({planner.unit}, {source}), "
        f"frontier of {len(planner.frontier)} plans up to "
        f"{planner.frontier.costs[0] / max(planner.frontier.costs[-1], 1e-30):.2f}x predicted, "
        f"allocated in {planner.allocate_seconds * 1000:.1f} ms"
    )
    with events.phase("trials", search.remaining(study.get_trials(deepcopy=False)), "trial"):
        _run_trials(study, planner, objective, reporter, search, deadline, catch)
    return planner


def _run_trials(
    study: optuna.Study,
    planner: Planner,
    objective: Callable[[optuna.Trial], float],
    reporter: Callable[[optuna.Study, FrozenTrial], None],
    search: OptunaSearch,
    deadline: float | None,
    catch: tuple[type[Exception], ...],
) -> None:
    """The planner's proposals as real trials, then the sampler takes what budget is left."""
    while True:
        search.snapshot = study.get_trials(deepcopy=False)
        left = search.remaining(search.snapshot)
        if (left is not None and left <= 0) or (
            deadline is not None and time.monotonic() >= deadline
        ):
            break
        started = time.perf_counter()
        proposal = planner.next(search.snapshot)
        planner.propose_seconds += time.perf_counter() - started
        if proposal is None:
            break
        study.enqueue_trial(proposal.params, user_attrs={TAG: proposal.tag, ENQUEUED_BY: WORKER})
        study.optimize(
            objective, n_trials=1, catch=catch, callbacks=[reporter], gc_after_trial=False
        )
    try:
        # the sampler takes whatever budget is left (and waits for other workers' running trials)
        search.run(study, objective, deadline=deadline, catch=catch, after_trial=reporter)
    finally:
        _drop_own_waiting(study, search.open_storage())


def _drop_own_waiting(study: optuna.Study, storage: optuna.storages.BaseStorage | None) -> None:
    """Fail the proposals this process enqueued that nobody ran (another worker took the slot
    first, or the budget ran out): a finished study holds no WAITING trial. Failed without a
    recorded reason, they use no budget."""
    if storage is None:
        return  # a study only this process holds, in memory: nobody else took a slot
    waiting = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if t.user_attrs.get(ENQUEUED_BY) == WORKER
    ]
    if not waiting:
        return
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in waiting:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        with contextlib.suppress(RuntimeError, ValueError):  # someone popped it meanwhile
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
