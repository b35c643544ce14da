"""The kept plan as the report marks it, and where a trial's speedup came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from sketchtune._search._best import Decision
    from sketchtune._search._kept import KeptTrial
    from sketchtune.results import TrialRecord

__all__ = ["KeptMark", "SpeedSource", "speed_source"]

SpeedSource = Literal["measured", "flops", "dense"]


def speed_source(record: TrialRecord) -> SpeedSource | None:
    """What a trial's speedup is: ``"measured"`` (timed against the dense model),
    ``"flops"`` (the FLOP model), ``"dense"`` (every layer left dense: 1x by definition)
    or ``None`` (no speedup).

    With the FLOP speed model a trial's speedup *is* its FLOP estimate; a timed trial
    holds its interleaved rounds (or, recorded before rounds were kept, a speedup that
    differs from the estimate).
    """
    if record.rounds:
        return "measured"
    if record.speedup is None:
        return None
    if not record.plan:
        return "dense"
    return "flops" if record.speedup == record.flops_speedup else "measured"


@dataclass(frozen=True)
class KeptMark:
    """The kept plan as the report marks it: the trial(s) it came from and its figures.

    Attributes:
        trials: ``{study label: Optuna number}`` of the trial whose plan was kept: one
            entry for a whole-model study, one per study whose winner a combined plan
            holds (its figures are then the combination's, measured as one plan).
        speedup: the kept plan's speedup: the confirmed median of interleaved rounds
            when ``rounds`` is set, else the FLOP model's estimate (``speed_model="flops"``).
        lower: lower end of the confirmed figure's 95% interval.
        upper: upper end of that interval.
        rounds: interleaved rounds behind the confirmed figure.
        accuracy: the kept plan's accuracy.
        speed_model: ``"measured"``, ``"flops"`` or ``None`` (accuracy only).
        study: the Optuna study whose user attribute ``"sketchtune:kept"`` holds the record.
        machine: where the figure was confirmed (host, CPU or GPU, torch version).
        date: when (UTC, ISO 8601).
        others_cpu: the share of the CPUs other processes took while it was confirmed.
    """

    trials: dict[str, int] = field(default_factory=dict)
    speedup: float | None = None
    lower: float | None = None
    upper: float | None = None
    rounds: int | None = None
    accuracy: float | None = None
    speed_model: str | None = None
    study: str | None = None
    machine: str | None = None
    date: str | None = None
    others_cpu: float | None = None

    @property
    def combined(self) -> bool:
        """The kept plan joins several studies' winners (no single trial measured it)."""
        return len(self.trials) > 1

    @property
    def confirmed(self) -> bool:
        """A timed confirmation stands behind :attr:`speedup`."""
        return self.rounds is not None

    def keeps(self, record: TrialRecord) -> bool:
        """Whether ``record`` is the trial (of its study) whose plan was kept."""
        return self.trials.get(record.layer_name) == record.trial

    @classmethod
    def of(
        cls,
        decision: Decision | None,
        records: Sequence[TrialRecord],
        study: KeptTrial | None = None,
    ) -> KeptMark | None:
        """From the tuner's ``decision``, its ``records`` and what it wrote into the study.

        ``None`` when nothing was kept (the model stays dense).
        """
        if decision is None or not decision.plan:
            return None
        trials: dict[str, int] = {}
        for record in records:
            if any(decision.layer_trials.get(name) == record.trial for name in record.plan):
                trials.setdefault(record.layer_name, record.trial)
        confirmation = decision.confirmation or {}
        if study is not None:
            speed_model = study.speed_model
        else:
            speed_model = "measured" if confirmation else None
        return cls(
            trials=trials,
            speedup=decision.speedup,
            lower=confirmation.get("lower"),
            upper=confirmation.get("upper"),
            rounds=confirmation.get("rounds"),
            others_cpu=confirmation.get("others_cpu"),
            accuracy=decision.accuracy,
            speed_model=speed_model,
            study=None if study is None else study.study,
            machine=None if study is None else study.machine,
            date=None if study is None else study.date,
        )
