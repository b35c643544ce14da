"""A combination of per-study winners (``separate`` strategy): validated, backed off layer by
layer until it keeps the floor and, with timed speed, is confirmed faster on this machine."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sketchtune._search._decision import Decision
from sketchtune._search._judge import Judge, TrialFailed
from sketchtune.plan import SketchPlan
from sketchtune.results import TrialRecord

__all__ = ["union", "validated_combination"]


def validated_combination(
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
        plan = union(members.values())
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


def union(records: Iterable[TrialRecord]) -> SketchPlan:
    """One plan holding every layer of ``records``' plans."""
    layers: dict[str, Any] = {}
    for record in records:
        layers.update(record.plan)
    return SketchPlan(layers)
