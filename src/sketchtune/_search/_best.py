"""Choosing the kept plan: the best trial so far, the never-slower confirmation of the fastest
plans on this machine, and backing off a combination of per-layer winners."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from sketchtune._search._confirm import Confirmation
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


@dataclass
class Decision:
    """The plan the search keeps, with the figures that describe it.

    Attributes:
        trial: Optuna's number of the kept trial (``None``: a combination, or nothing kept).
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
    trial: int | None = None
    #: each kept layer's trial (its study's Optuna number)
    layer_trials: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a results file holds them)."""
        data = dataclasses.asdict(self)
        data["plan"] = self.plan.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """From :meth:`to_dict` (the plan is checked as any loaded plan is).

        Raises:
            ValueError: the data is not a decision.
        """
        if not isinstance(data, Mapping) or "plan" not in data:
            raise ValueError(f"a decision needs a plan, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"plan"}
        values = {k: data[k] for k in known if k in data}
        return cls(SketchPlan.from_dict(data["plan"]), **values)


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
            decision = Decision(SketchPlan()) if best is None else _decision_of(best)
        if decision.plan:
            speed = f"speedup {decision.speedup:.2f}x at " if decision.speedup is not None else ""
            say(f"best: {decision.plan!r} ({speed}accuracy {decision.accuracy:.4f})")
            decision.verdict = decision.verdict or _kept_text(decision)
        elif not decision.verdict:
            decision.verdict = why_no_candidate(records, judge.floor.describe(), judge.mode)
            say(decision.verdict)
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


def score_text(record: TrialRecord, *, confirmed: bool = False) -> str:
    if record.speedup is not None:
        what = "confirmed " if confirmed else ""
        return f"{what}{record.speedup:.2f}x at accuracy {record.accuracy:.4f}"
    return f"accuracy {record.accuracy:.4f}"


def _kept_text(decision: Decision) -> str:
    speed = ""
    if decision.confirmation is not None:
        c = decision.confirmation
        speed = (
            f" at {c['speedup']:.2f}x (confirmed: 95% interval {c['lower']:.2f}x-"
            f"{c['upper']:.2f}x over {c['rounds']} interleaved rounds)"
        )
    elif decision.speedup is not None:
        speed = f" at {decision.speedup:.2f}x"
    accuracy = "" if decision.accuracy is None else f", accuracy {decision.accuracy:.4f}"
    trial = "" if decision.trial is None else f" (trial {decision.trial + 1})"
    return f"kept a plan sketching {len(decision.plan)} layer(s){trial}{speed}{accuracy}."


def _decision_of(record: TrialRecord, confirmation: Confirmation | None = None) -> Decision:
    if confirmation is None:
        return Decision(
            SketchPlan(record.plan),
            record.accuracy,
            record.speedup,
            speed=record.speed,
            trial=record.trial,
        )
    return Decision(
        SketchPlan(record.plan),
        record.accuracy,
        confirmation.speedup,
        speed=float(confirmation.to_dict()["tuned_throughput"]),
        confirmation=confirmation.to_dict(),
        trial=record.trial,
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
        decision = _decision_of(*winner)
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


def _validated_combination(
    bests: dict[str, TrialRecord],
    judge: Judge,
    dense_accuracy: float | None,
    say: Callable[[str], None],
    *,
    timed: bool,
) -> Decision:
    """Evaluate the union of per-study winners; drop the least efficient until it passes.

    Passing means keeping the floor and, with a timed speed objective, a speedup over
    the dense model confirmed on this machine.
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
                    confirmation = judge.confirm(plan, prior=None, beat=1.0)
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
                layer_trials={
                    name: record.trial for record in members.values() for name in record.plan
                },
                speed=(
                    float(confirmation.to_dict()["tuned_throughput"])
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
