"""Choosing the winner: per-study bests, re-measuring the fastest plans, backing off a
combination of per-layer winners, and agreeing with other workers on one plan."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from sketchtune._search._confirm import ROUNDS, Confirmation
from sketchtune._search._judge import Judge, TrialFailed
from sketchtune._search._studies import StudySpec
from sketchtune._search._trialinfo import TrialInfo
from sketchtune.evaluate import Mode
from sketchtune.plan import SketchPlan
from sketchtune.results import TrialRecord, json_ready, record_from_trial

__all__ = ["BestTracker", "Decision", "choose", "finish", "score_text"]

_STUDY_BEST = "sketchtune:best"


class BestTracker:
    """The best feasible trial of each study so far (larger speedup, else better accuracy)."""

    def __init__(self, mode: Mode) -> None:
        self._mode = mode
        self._best: dict[str, TrialRecord] = {}

    def consider(self, label: str, record: TrialRecord) -> None:
        """Keep ``record`` as ``label``'s best if it is feasible and beats the best so far."""
        best = self._best.get(label)
        # A sketch that is not faster than the dense layer is never worth adopting.
        useful = record.feasible and (record.speedup is None or record.speedup > 1.0)
        if useful and (best is None or self.rank(record) > self.rank(best)):
            self._best[label] = record

    def consider_study(self, label: str, study: optuna.Study) -> None:
        """Let every finished trial of ``study`` (earlier runs, other workers) compete."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if TrialInfo.of(trial).skipped is None:
                self.consider(label, record_from_trial(label, trial))

    def best(self, label: str) -> TrialRecord | None:
        return self._best.get(label)

    def all(self) -> dict[str, TrialRecord]:
        return dict(self._best)

    def rank(self, record: TrialRecord) -> float:
        """Larger is better: the speedup, else the accuracy (negated for ``mode='min'``)."""
        if record.speedup is not None:
            return float(record.speedup)
        accuracy = float(record.accuracy if record.accuracy is not None else -math.inf)
        return accuracy if self._mode == "max" else -accuracy


@dataclass
class Decision:
    """The plan the search keeps, with the figures that describe it.

    Attributes:
        confirmation: the confirming measurement of the kept plan (timed speed only),
            from :meth:`Confirmation.to_dict`.
        verdict: one line saying what was kept, or why the model stays dense (the
            floor broken, plans not faster, not confirmed faster, a combination backed off).
    """

    plan: SketchPlan
    accuracy: float | None = None
    speedup: float | None = None
    combination_log: list[dict[str, Any]] = field(default_factory=list)
    confirmation_log: list[dict[str, Any]] = field(default_factory=list)
    speed: float | None = None
    confirmation: dict[str, Any] | None = None
    verdict: str = ""


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

    With a timed speed objective, the kept plan is the one whose confirming
    measurement (:mod:`sketchtune._search._confirm`) shows it faster than the dense
    model with confidence; when none does, the model stays dense.

    Args:
        bests: each study's best feasible record.
        studies: the Optuna studies searched (one, or one per layer/group).
        records: every finished trial of every study (candidates for confirmation).
        judge: evaluates plans (confirmations, combinations).
        interrupted: the search was stopped by Ctrl-C (nothing more is evaluated).
        dense_accuracy: the baseline (to weigh accuracy lost against speed gained).
        say: where progress messages go.
    """
    timed = judge.evaluator.has_throughput and judge.speed_model is None
    if not bests:
        verdict = why_no_candidate(records, judge.floor.describe(), judge.mode)
        say(verdict)
        return Decision(SketchPlan(), verdict=verdict)
    if len(studies) == 1 or len(bests) == 1:
        study = studies[0] if len(studies) == 1 else None
        agreed = _agreed_best(study) if study is not None else None
        if agreed is not None:  # another worker already settled it for this study's trials
            decision = agreed
        elif interrupted or not timed:
            decision = _decision_of(next(iter(bests.values())))
        else:
            decision = _confirm_best(records, judge, say)
        if study is not None and not interrupted and decision.plan:
            decision = _agree_on_best(study, decision)
        if decision.plan:
            speed = f"speedup {decision.speedup:.2f}x at " if decision.speedup is not None else ""
            say(f"best: {decision.plan!r} ({speed}accuracy {decision.accuracy:.4f})")
        if not decision.verdict:
            decision.verdict = _kept_text(decision)
        return decision
    if interrupted:
        verdict = "interrupted: the combined plan of the per-layer winners was not validated."
        say(verdict)
        return Decision(_union(bests.values()), verdict=verdict)
    return _validated_combination(bests, judge, dense_accuracy, say, timed=timed)


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
        best.all(),
        [studies[spec.label] for spec in specs],
        records,
        judge,
        interrupted=interrupted,
        dense_accuracy=dense_accuracy,
        say=say,
    )
    kept = {name: layer for name, layer in decision.plan.items() if name in selected}
    return dataclasses.replace(decision, plan=SketchPlan(kept))


def why_no_candidate(records: Sequence[TrialRecord], floor: str, mode: Mode) -> str:
    """Why no trial is a candidate: the floor broken, or nothing measured faster."""
    finished = [r for r in records if r.state == "COMPLETE" and r.plan]
    if not finished:
        return "no trial finished; the model stays dense."
    feasible = [r for r in finished if r.feasible]
    if not feasible:
        scored = [r for r in finished if r.accuracy is not None]
        if not scored:
            return f"no trial kept the accuracy floor ({floor}); the model stays dense."
        sign = 1.0 if mode == "max" else -1.0
        closest = max(scored, key=lambda r: sign * float(r.accuracy or 0.0))
        return (
            f"no trial kept the accuracy floor ({floor}): the closest scored "
            f"{closest.accuracy:.4f} (trial {closest.trial + 1}); the model stays dense."
        )
    fastest = max(feasible, key=lambda r: r.speedup or 0.0)
    plans = len({json.dumps(r.plan, sort_keys=True) for r in feasible})
    return (
        f"{plans} plan(s) kept the floor, but none was measured faster than the "
        f"dense model (fastest {fastest.speedup or 0.0:.2f}x, trial {fastest.trial + 1}); "
        "the model stays dense."
    )


def _kept_text(decision: Decision) -> str:
    if not decision.plan:
        return "the model stays dense."
    speed = ""
    if decision.confirmation is not None:
        c = decision.confirmation
        speed = (
            f" at {c['speedup']:.2f}x (confirmed: lower bound {c['lower']:.2f}x over "
            f"{c['rounds']} interleaved rounds)"
        )
    elif decision.speedup is not None:
        speed = f" at {decision.speedup:.2f}x"
    accuracy = "" if decision.accuracy is None else f", accuracy {decision.accuracy:.4f}"
    return f"kept a plan sketching {len(decision.plan)} layer(s){speed}{accuracy}."


def score_text(record: TrialRecord) -> str:
    if record.speedup is not None:
        return f"speedup {record.speedup:.2f}x at accuracy {record.accuracy:.4f}"
    return f"accuracy {record.accuracy:.4f}"


def _decision_of(record: TrialRecord, confirmation: Confirmation | None = None) -> Decision:
    if confirmation is None:
        return Decision(
            SketchPlan(record.plan), record.accuracy, record.speedup, speed=record.speed
        )
    return Decision(
        SketchPlan(record.plan),
        record.accuracy,
        confirmation.speedup,
        speed=statistics.median(confirmation.plan_rates),
        confirmation=confirmation.to_dict(),
    )


def _confirm_best(
    records: Sequence[TrialRecord],
    judge: Judge,
    say: Callable[[str], None],
    *,
    batch: int = 3,
    limit: int = 6,
) -> Decision:
    """Confirm the fastest feasible plans, ``batch`` at a time, and keep the fastest confirmed.

    Candidates are the distinct feasible plans, fastest recorded speedup
    first. When none of a batch is confirmed the next batch is tried, up to
    ``limit`` plans; when none is confirmed at all, the model stays dense.
    """
    pool: dict[str, TrialRecord] = {}
    for record in sorted(records, key=lambda r: -(r.speedup or 0.0)):
        key = json.dumps(record.plan, sort_keys=True)
        if record.feasible and record.plan and (record.speedup or 0.0) > 1.0 and key not in pool:
            pool[key] = record
    candidates = list(pool.values())[:limit]
    log: list[dict[str, Any]] = []
    for start in range(0, len(candidates), batch):
        confirmed: list[tuple[TrialRecord, Confirmation]] = []
        for record in candidates[start : start + batch]:
            try:
                confirmation = Confirmation.of(*judge.timed_rates(SketchPlan(record.plan), ROUNDS))
            except TrialFailed as exc:
                log.append(
                    {"trial": record.trial, "layers": sorted(record.plan), "failed": str(exc)}
                )
                continue
            log.append(
                {
                    "trial": record.trial,
                    "layers": sorted(record.plan),
                    "measured": record.speedup,
                    **confirmation.to_dict(),
                }
            )
            say(
                f"confirming trial {record.trial} (measured {record.speedup:.2f}x): "
                f"{confirmation.describe()} -> "
                + ("confirmed" if confirmation.confirmed else "not confirmed")
            )
            if confirmation.confirmed:
                confirmed.append((record, confirmation))
        if confirmed:
            record, confirmation = max(confirmed, key=lambda rc: rc[1].speedup)
            decision = _decision_of(record, confirmation)
            decision.confirmation_log = log
            return decision
    measured = "; ".join(
        f"trial {step['trial'] + 1}: measured {step['measured']:.2f}x, confirmed "
        f"{step['speedup']:.2f}x (lower bound {step['lower']:.2f}x)"
        if "failed" not in step
        else f"trial {step['trial'] + 1}: could not be timed ({step['failed']})"
        for step in log[:3]
    )
    verdict = (
        f"{len(candidates)} plan(s) kept the floor and measured faster, but none was confirmed "
        f"faster than the dense model in a repeated interleaved measurement ({measured}); "
        "the model stays dense."
    )
    say(verdict)
    return Decision(SketchPlan(), confirmation_log=log, verdict=verdict)


def _validated_combination(
    bests: dict[str, TrialRecord],
    judge: Judge,
    dense_accuracy: float | None,
    say: Callable[[str], None],
    *,
    timed: bool,
) -> Decision:
    """Evaluate the union of per-study winners; drop the least efficient until it passes.

    Passing means keeping the floor and, with a timed speed objective, a
    confirmed speedup over the dense model.
    """
    members = dict(bests)
    baseline = dense_accuracy if dense_accuracy is not None else 0.0
    log: list[dict[str, Any]] = []
    backed_off: list[str] = []
    while members:
        plan = _union(members.values())
        reason = ""
        try:
            outcome = judge.evaluate(plan, None, measure_speed=not timed)
        except TrialFailed as exc:
            outcome = None
            reason = str(exc)
        step: dict[str, Any] = {
            "layers": sorted(members),
            "accuracy": None,
            "speedup": None,
            "feasible": False,
        }
        confirmation = None
        if outcome is not None:
            step.update(
                accuracy=outcome.accuracy, speedup=outcome.speedup, feasible=outcome.feasible
            )
            if outcome.feasible and timed:
                try:
                    confirmation = Confirmation.of(*judge.timed_rates(plan, ROUNDS))
                except TrialFailed as exc:
                    reason = str(exc)
                else:
                    step.update(speedup=confirmation.speedup, confirmed=confirmation.confirmed)
        log.append(step)
        passes = outcome is not None and outcome.feasible
        if passes and (confirmation is None or confirmation.confirmed) and not (timed and reason):
            assert outcome is not None
            speedup = confirmation.speedup if confirmation is not None else outcome.speedup
            speed_text = f", speedup {speedup:.2f}x" if speedup is not None else ""
            verdict = (
                f"combined plan of {len(members)} study winner(s) passes: accuracy "
                f"{outcome.accuracy:.4f} ({judge.floor.describe()}){speed_text}"
            )
            if backed_off:
                verdict += f"; backed off {', then '.join(backed_off)}"
            say(verdict)
            return Decision(
                plan,
                outcome.accuracy,
                speedup,
                log,
                speed=(
                    statistics.median(confirmation.plan_rates)
                    if confirmation is not None
                    else outcome.speed
                ),
                confirmation=None if confirmation is None else confirmation.to_dict(),
                verdict=verdict + ".",
            )
        if outcome is None or not outcome.feasible:
            what = (
                f"accuracy {outcome.accuracy:.4f}" if outcome is not None else f"failed ({reason})"
            )
            why = f"breaks the floor ({what}, {judge.floor.describe()})"
        else:
            assert confirmation is not None or reason
            why = (
                f"is not confirmed faster than the dense model ({confirmation.describe()})"
                if confirmation is not None
                else f"could not be timed ({reason})"
            )
        drop = min(members, key=lambda label: _efficiency(members[label], judge, baseline))
        say(f"combined plan of {len(members)} winner(s) {why}; backing off {drop!r}")
        backed_off.append(f"{drop!r} (the plan of {len(members)} {why})")
        del members[drop]
    verdict = (
        "no combination of per-layer winners keeps the floor faster: backed off "
        f"{', then '.join(backed_off)}; the model stays dense."
    )
    say(verdict)
    return Decision(SketchPlan(), combination_log=log, verdict=verdict)


def _efficiency(record: TrialRecord, judge: Judge, dense_accuracy: float) -> float:
    """Speed gained per accuracy lost by one study's winner (the least efficient is backed off first)."""
    speedup = (
        record.speedup
        if record.speedup is not None
        else judge.flops_speedup(SketchPlan(record.plan))
    )
    accuracy = record.accuracy if record.accuracy is not None else dense_accuracy
    return (speedup - 1.0) / max(abs(dense_accuracy - accuracy), 1e-12)


def _union(records: Iterable[TrialRecord]) -> SketchPlan:
    """One plan holding every layer of ``records``' plans."""
    layers: dict[str, Any] = {}
    for record in records:
        layers.update(record.plan)
    return SketchPlan(layers)


def _finished(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)


def _agreed_best(study: optuna.Study) -> Decision | None:
    """The decision a worker stored for the study's current set of finished trials, if any."""
    stored = study.user_attrs.get(_STUDY_BEST)
    if not isinstance(stored, dict) or stored.get("finished") != _finished(study):
        return None
    try:
        data = stored["decision"]
        return Decision(
            SketchPlan.from_dict(data["plan"]),
            data["accuracy"],
            data["speedup"],
            speed=data.get("speed"),
            confirmation=data.get("confirmation"),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _agree_on_best(study: optuna.Study, decision: Decision) -> Decision:
    """Store ``decision`` as the study's unless a worker stored one first; return the stored one.

    Workers sharing a study finish together (they wait for each other's last
    trials), and confirming the fastest plans is noisy; this makes every
    worker report the same plan.
    """
    agreed = _agreed_best(study)
    if agreed is not None:
        return agreed
    data = {
        "plan": decision.plan.to_dict(),
        "accuracy": decision.accuracy,
        "speedup": decision.speedup,
        "speed": decision.speed,
        "confirmation": decision.confirmation,
    }
    study.set_user_attr(_STUDY_BEST, {"finished": _finished(study), "decision": json_ready(data)})
    stored = _agreed_best(study)
    if stored is None:
        return decision
    return dataclasses.replace(stored, confirmation_log=decision.confirmation_log)
