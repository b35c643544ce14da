"""Choosing the winner: per-study bests, re-measuring the fastest plans, backing off a
combination of per-layer winners, and agreeing with other workers on one plan."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from sketchtune._judge import Judge, TrialFailed
from sketchtune._trialinfo import TrialInfo
from sketchtune.evaluate import Mode
from sketchtune.plan import SketchPlan
from sketchtune.results import TrialRecord, json_ready, record_from_trial

__all__ = ["BestTracker", "Decision", "choose", "score_text"]

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
    """The plan the search keeps, with the figures that describe it."""

    plan: SketchPlan
    accuracy: float | None = None
    speedup: float | None = None
    combination_log: list[dict[str, Any]] = field(default_factory=list)
    confirmation_log: list[dict[str, Any]] = field(default_factory=list)
    speed: float | None = None


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

    Args:
        bests: each study's best feasible record.
        studies: the Optuna studies searched (one, or one per layer/group).
        records: every finished trial of every study (for re-measuring).
        judge: evaluates plans (re-measures, combinations).
        interrupted: the search was stopped by Ctrl-C (nothing more is evaluated).
        dense_accuracy: the baseline (to weigh accuracy lost against speed gained).
        say: where progress messages go.
    """
    if not bests:
        say("no feasible configuration faster than the dense model was found; it stays dense.")
        return Decision(SketchPlan())
    if len(studies) == 1 or len(bests) == 1:
        record = next(iter(bests.values()))
        study = studies[0] if len(studies) == 1 else None
        agreed = _agreed_best(study) if study is not None else None
        confirmation: list[dict[str, Any]] = []
        if agreed is not None:
            record = agreed  # another worker already settled it for this study's trials
        elif not interrupted and judge.evaluator.has_throughput and judge.speed_model is None:
            record, confirmation = _confirm(record, records, judge, say)
        if study is not None and not interrupted:
            record = _agree_on_best(study, record)
        decision = Decision(
            SketchPlan(record.plan),
            record.accuracy,
            record.speedup,
            [],
            confirmation,
            speed=record.speed,
        )
        say(f"best: {decision.plan!r} ({score_text(record)})")
        return decision
    if interrupted:
        say("interrupted: the combined plan of the per-layer winners was not validated.")
        return Decision(_union(bests.values()))
    return _validated_combination(bests, judge, dense_accuracy, say)


def score_text(record: TrialRecord) -> str:
    if record.speedup is not None:
        return f"speedup {record.speedup:.2f}x at accuracy {record.accuracy:.4f}"
    return f"accuracy {record.accuracy:.4f}"


def _confirm(
    best: TrialRecord,
    records: Sequence[TrialRecord],
    judge: Judge,
    say: Callable[[str], None],
    candidates: int = 3,
) -> tuple[TrialRecord, list[dict[str, Any]]]:
    """Re-measure the fastest feasible plans once more and keep the fastest.

    A single timed measurement per trial is noisy, and the maximum of many noisy
    measurements favours lucky ones (the winner's curse). The top ``candidates``
    distinct plans are measured again, interleaved with the dense model; their
    speedup is the mean of both measurements.
    """
    pool: dict[str, TrialRecord] = {}
    for record in sorted(records, key=lambda r: -(r.speedup or 0.0)):
        key = json.dumps(record.plan, sort_keys=True)
        if record.feasible and record.plan and (record.speedup or 0.0) > 1.0 and key not in pool:
            pool[key] = record
        if len(pool) == candidates:
            break
    if len(pool) < 2:
        return best, []
    confirmed: list[TrialRecord] = []
    for record in pool.values():
        try:
            outcome = judge.evaluate(SketchPlan(record.plan), None)
        except TrialFailed:
            continue
        if outcome.feasible and outcome.speedup is not None:
            speedup = (outcome.speedup + (record.speedup or outcome.speedup)) / 2
            confirmed.append(dataclasses.replace(record, speedup=speedup, score=speedup))
    log = [{"trial": r.trial, "layers": sorted(r.plan), "speedup": r.speedup} for r in confirmed]
    if not confirmed:
        return best, log
    winner = max(confirmed, key=lambda r: r.speedup or 0.0)
    if winner.trial != best.trial:
        say(
            f"re-measured the {len(confirmed)} fastest plans: trial {winner.trial} "
            f"({winner.speedup:.2f}x) beats trial {best.trial}"
        )
    return winner, log


def _validated_combination(
    bests: dict[str, TrialRecord],
    judge: Judge,
    dense_accuracy: float | None,
    say: Callable[[str], None],
) -> Decision:
    """Evaluate the union of per-study winners; drop the least efficient until it passes."""
    members = dict(bests)
    baseline = dense_accuracy if dense_accuracy is not None else 0.0
    log: list[dict[str, Any]] = []
    while members:
        plan = _union(members.values())
        reason = ""
        try:
            outcome = judge.evaluate(plan, None)
        except TrialFailed as exc:
            outcome = None
            reason = str(exc)
        step: dict[str, Any] = {
            "layers": sorted(members),
            "accuracy": None,
            "speedup": None,
            "feasible": False,
        }
        if outcome is not None:
            step.update(
                accuracy=outcome.accuracy, speedup=outcome.speedup, feasible=outcome.feasible
            )
        log.append(step)
        if outcome is not None and outcome.feasible:
            speed_text = f", speedup {outcome.speedup:.2f}x" if outcome.speedup is not None else ""
            say(
                f"combined plan of {len(members)} study winner(s) passes: accuracy "
                f"{outcome.accuracy:.4f} ({judge.floor.describe()}){speed_text}"
            )
            return Decision(plan, outcome.accuracy, outcome.speedup, log, speed=outcome.speed)
        what = f"accuracy {outcome.accuracy:.4f}" if outcome is not None else f"failed ({reason})"
        drop = min(members, key=lambda label: _efficiency(members[label], judge, baseline))
        say(
            f"combined plan of {len(members)} winner(s) breaks the floor ({what}, "
            f"{judge.floor.describe()}); backing off {drop!r}"
        )
        del members[drop]
    say("no combination of per-layer winners keeps the floor; the model stays dense.")
    return Decision(SketchPlan(), combination_log=log)


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


def _agreed_best(study: optuna.Study) -> TrialRecord | None:
    """The best plan a worker stored for the study's current set of finished trials, if any."""
    stored = study.user_attrs.get(_STUDY_BEST)
    if not isinstance(stored, dict) or stored.get("finished") != _finished(study):
        return None
    try:
        return TrialRecord(**stored["record"])
    except (KeyError, TypeError):
        return None


def _agree_on_best(study: optuna.Study, record: TrialRecord) -> TrialRecord:
    """Store ``record`` as the study's best unless a worker stored one first; return the stored one.

    Workers sharing a study finish together (they wait for each other's last
    trials), and re-measuring the fastest plans is noisy; this makes every
    worker report the same plan.
    """
    agreed = _agreed_best(study)
    if agreed is not None:
        return agreed
    study.set_user_attr(
        _STUDY_BEST, {"finished": _finished(study), "record": json_ready(asdict(record))}
    )
    return _agreed_best(study) or record
