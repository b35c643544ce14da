"""Choosing the kept plan: the best trial so far, and the never-slower confirmation of the
fastest plans on this machine (a combination of per-layer winners: :mod:`._combine`)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from sketchtune._search._combine import union, validated_combination
from sketchtune._search._confirm import Confirmation
from sketchtune._search._decision import (
    Decision,
    decision_of,
    kept_text,
    score_text,
    why_no_candidate,
)
from sketchtune._search._judge import Judge, TrialFailed
from sketchtune._search._studies import StudySpec
from sketchtune._search._trialinfo import TrialInfo
from sketchtune.evaluate import Mode
from sketchtune.plan import SketchPlan
from sketchtune.results import TrialRecord, record_from_trial

__all__ = ["BestTracker", "Decision", "choose", "finish", "score_text", "why_no_candidate"]

#: plans tried, fastest first, before the model is left dense
_CANDIDATES = 6


def timing_of(record: TrialRecord) -> Confirmation | None:
    """The interleaved rounds behind a record's speedup (``None`` when not timed)."""
    return Confirmation.from_rounds(record.rounds) if record.rounds else None


class BestTracker:
    """The best trial of each study so far, judged against today's floor.

    With measured speed, the best is the fastest trial *confirmed in this run*: what
    logs and plots show as the best, and the figure a new trial must beat to be timed
    on. A faster-looking trial measured elsewhere (an earlier run, another worker) is
    only a candidate, confirmed here before it can be kept. With the FLOP model (or
    no speed at all) there is nothing to confirm.
    """

    def __init__(self, mode: Mode, judge: Judge) -> None:
        self._mode = mode
        self._judge = judge
        self._best: dict[str, TrialRecord] = {}
        self._leading: dict[str, TrialRecord] = {}

    @property
    def timed(self) -> bool:
        return self._judge.evaluator.has_throughput and self._judge.speed_model is None

    def consider(self, label: str, record: TrialRecord) -> None:
        """Keep ``record`` as ``label``'s best if it is feasible and beats the best so far."""
        # A sketch that is not faster than the dense layer is never worth adopting.
        if not (record.feasible and (record.speedup is None or record.speedup > 1.0)):
            return
        leading = self._leading.get(label)
        if leading is None or self.rank(record) > self.rank(leading):
            self._leading[label] = record
        if self.timed and not (record.confirmed and record.run == self._judge.run_id):
            return
        best = self._best.get(label)
        if best is None or self.rank(record) > self.rank(best):
            self._best[label] = record

    def consider_study(self, label: str, study: optuna.Study) -> None:
        """Let every finished trial of ``study`` (earlier runs, other workers) compete."""
        floor = self._judge.floor
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if TrialInfo.of(trial).skipped is None:
                self.consider(label, record_from_trial(label, trial, floor))

    def best(self, label: str) -> TrialRecord | None:
        return self._best.get(label)

    def beat(self, label: str) -> float:
        """The speedup a new trial of ``label`` must beat to be timed on (at least 1)."""
        best = self._best.get(label)
        if best is None or best.speedup is None:
            return 1.0
        return max(1.0, float(best.speedup))

    def leaders(self) -> dict[str, TrialRecord]:
        """Each study's fastest feasible trial, confirmed or not (candidates for the end)."""
        return dict(self._leading)

    def rank(self, record: TrialRecord) -> float:
        """Larger is better: the speedup, else the accuracy (negated for ``mode='min'``)."""
        if record.speedup is not None:
            return float(record.speedup)
        accuracy = float(record.accuracy if record.accuracy is not None else -math.inf)
        return accuracy if self._mode == "max" else -accuracy


def choose(
    bests: dict[str, TrialRecord],
    studies: Sequence[optuna.Study],
    records: Sequence[TrialRecord],
    judge: Judge,
    *,
    interrupted: bool,
    dense_accuracy: float | None,
    say: Callable[[str], None],
) -> Decision:
    """The global winner, or the validated combination of per-study winners.

    With a timed speed objective, the kept plan is confirmed faster than the dense
    model on this machine in this run (:mod:`sketchtune._search._confirm`); when no
    feasible plan is, the model stays dense.

    Args:
        bests: each study's fastest feasible record (confirmed here or not).
        studies: the Optuna studies searched (one, or one per layer/group).
        records: every finished trial of every study, judged against today's floor.
        judge: evaluates plans (confirmations, combinations).
        interrupted: the search was stopped by Ctrl-C (nothing more is evaluated).
        dense_accuracy: the baseline (to weigh accuracy lost against speed gained).
        say: where progress messages go.
    """
    timed = judge.evaluator.has_throughput and judge.speed_model is None
    candidates = _candidates(records)
    if len(studies) == 1 or len(bests) <= 1:
        if timed:
            # interrupted: nothing more is timed, only what this run already confirmed counts
            decision = _confirm_best(candidates, judge, say, retime=not interrupted)
        else:
            best = next(iter(bests.values()), None)
            decision = Decision(SketchPlan()) if best is None else decision_of(best)
        if decision.plan:
            speed = f"speedup {decision.speedup:.2f}x at " if decision.speedup is not None else ""
            say(f"best: {decision.plan!r} ({speed}accuracy {decision.accuracy:.4f})")
            decision.verdict = decision.verdict or kept_text(decision)
        elif not decision.verdict:
            decision.verdict = why_no_candidate(records, judge.floor.describe(), judge.mode)
            say(decision.verdict)
        return decision
    if interrupted:
        verdict = "interrupted: the combined plan of the per-layer winners was not validated."
        say(verdict)
        return Decision(union(bests.values()), verdict=verdict)
    return validated_combination(bests, judge, dense_accuracy, say, timed=timed)


def finish(
    best: BestTracker,
    specs: Sequence[StudySpec],
    studies: Mapping[str, optuna.Study],
    records: Sequence[TrialRecord],
    judge: Judge,
    *,
    selected: Collection[str],
    interrupted: bool,
    dense_accuracy: float | None,
    say: Callable[[str], None],
) -> Decision:
    """The search's decision, from every finished trial of its studies (other workers' too).

    The kept plan only ever sketches layers in ``selected`` (this run's selection).
    """
    for spec in specs:
        best.consider_study(spec.label, studies[spec.label])
    decision = choose(
        best.leaders(),
        [studies[spec.label] for spec in specs],
        records,
        judge,
        interrupted=interrupted,
        dense_accuracy=dense_accuracy,
        say=say,
    )
    kept = {name: layer for name, layer in decision.plan.items() if name in selected}
    trials = decision.layer_trials or (
        {} if decision.trial is None else dict.fromkeys(kept, decision.trial)
    )
    return dataclasses.replace(
        decision,
        plan=SketchPlan(kept),
        layer_trials={n: t for n, t in trials.items() if n in kept},
    )


def _candidates(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Distinct feasible plans measured faster than dense, fastest recorded speedup first.

    Of several trials of one plan, the one timed over the most rounds stands for it.
    """
    pool: dict[str, TrialRecord] = {}
    for record in records:
        if not (record.feasible and record.plan and (record.speedup or 0.0) > 1.0):
            continue
        key = json.dumps(record.plan, sort_keys=True)
        held = pool.get(key)
        if held is None or len(record.rounds) > len(held.rounds):
            pool[key] = record
    return sorted(pool.values(), key=lambda r: -(r.speedup or 0.0))


def _confirm_best(
    candidates: Sequence[TrialRecord],
    judge: Judge,
    say: Callable[[str], None],
    *,
    retime: bool = True,
) -> Decision:
    """The fastest candidate confirmed faster than the dense model on this machine, this run.

    Candidates go fastest first. One timed and confirmed in this run is taken as
    measured (no new timing); any other is timed on, sequentially, until it is
    confirmed, falls to the winner so far or below, or runs out of rounds. A candidate
    recorded no faster than the confirmed winner can no longer win and is not timed.
    """
    winner: tuple[TrialRecord, Confirmation] | None = None
    log: list[dict[str, Any]] = []
    for record in candidates[:_CANDIDATES]:
        if winner is not None and (record.speedup or 0.0) <= winner[1].speedup:
            break
        prior = timing_of(record) if record.run == judge.run_id else None
        entry: dict[str, Any] = {
            "trial": record.trial,
            "layers": sorted(record.plan),
            "measured": record.speedup,
        }
        if prior is not None and prior.confirmed:
            confirmation = prior
            entry["retimed"] = False
        elif not retime:
            continue
        else:
            beat = 1.0 if winner is None else winner[1].speedup
            try:
                confirmation = judge.confirm(SketchPlan(record.plan), prior=prior, beat=beat)
            except TrialFailed as exc:
                log.append({**entry, "failed": str(exc)})
                continue
            entry["retimed"] = True
            say(
                f"confirming trial {record.trial + 1} (measured {record.speedup:.2f}x"
                f"{'' if prior is not None else ' in another run'}): {confirmation.describe()} -> "
                + ("confirmed" if confirmation.confirmed else "not confirmed")
            )
        log.append({**entry, **confirmation.to_dict()})
        if confirmation.confirmed and (winner is None or confirmation.speedup > winner[1].speedup):
            winner = (record, confirmation)
    if winner is not None:
        decision = decision_of(*winner)
        decision.confirmation_log = log
        return decision
    if not candidates:
        return Decision(SketchPlan(), confirmation_log=log)
    if not log:  # interrupted before anything was confirmed
        verdict = (
            "interrupted before a feasible plan was confirmed faster in this run; the model "
            "stays dense."
        )
        say(verdict)
        return Decision(SketchPlan(), verdict=verdict)
    measured = "; ".join(
        f"trial {step['trial'] + 1}: measured {step['measured']:.2f}x, confirmed "
        f"{step['speedup']:.2f}x (95% interval {step['lower']:.2f}x-{step['upper']:.2f}x)"
        if "failed" not in step
        else f"trial {step['trial'] + 1}: could not be timed ({step['failed']})"
        for step in log[:3]
    )
    verdict = (
        f"{len(log)} plan(s) kept the floor and measured faster, but none was confirmed "
        f"faster than the dense model in a repeated interleaved measurement ({measured}); "
        "the model stays dense."
    )
    say(verdict)
    return Decision(SketchPlan(), confirmation_log=log, verdict=verdict)
