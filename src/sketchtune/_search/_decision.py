"""The decision a search ends with: the kept plan, its figures, and one line that says why."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sketchtune._search._confirm import Confirmation, busy_note
from sketchtune.evaluate import Mode
from sketchtune.plan import SketchPlan
from sketchtune.results import TrialRecord

__all__ = ["Decision", "decision_of", "kept_text", "score_text", "why_no_candidate"]


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


def kept_text(decision: Decision) -> str:
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
    text = f"kept a plan sketching {len(decision.plan)} layer(s){trial}{speed}{accuracy}."
    if decision.confirmation is not None:
        c = decision.confirmation
        note = busy_note(c["lower"], c["upper"], c.get("others_cpu"))
        text += f" {note}" if note else ""
    return text


def decision_of(record: TrialRecord, confirmation: Confirmation | None = None) -> Decision:
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
