"""What a search kept, written into its Optuna study so that any reader of the study finds it.

Optuna's own ``study.best_trial`` is the trial with the highest value told to Optuna;
a finished trial's value cannot change, so it can name a plan sketchtune did not keep
(one measured elsewhere and not confirmed here, say). The study's user attribute
:data:`KEPT_ATTR` holds the plan that was kept, its trial and its confirmed figures;
every run and every worker writes its own decision there when it finishes (the last
one stands). From a bare study::

    optuna.load_study(study_name=..., storage=...).user_attrs["sketchtune:kept"]
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import optuna
import torch

from sketchtune.results import json_ready

__all__ = ["KEPT_ATTR", "KeptTrial"]

#: the study user attribute holding the kept plan (:meth:`KeptTrial.to_dict`)
KEPT_ATTR = "sketchtune:kept"


@dataclass(frozen=True)
class KeptTrial:
    """The plan a search kept and the figures that describe it.

    Attributes:
        study: the Optuna study's name.
        number: Optuna's number of the kept trial (the log shows it as trial
            ``number + 1``); ``None`` for a validated combination of per-layer winners,
            or when nothing was kept.
        plan: the kept plan (``SketchPlan.to_dict()``); no layers when the model stays dense.
        speedup: the confirmed speedup (median of interleaved rounds), or the FLOP
            model's figure; ``None`` without a speed objective.
        lower: lower end of the speedup's 95% interval (timed speed only).
        upper: upper end of that interval.
        rounds: interleaved timing rounds behind the figure.
        accuracy: the kept plan's accuracy.
        floor: the accuracy floor it was judged against.
        speed_model: ``"measured"``, ``"flops"`` or ``None``.
        machine: where the speedup was confirmed (host, CPU or GPU, torch version).
        date: when (UTC, ISO 8601).
        verdict: the one-line outcome (:attr:`SKAutoTuner.verdict`).
        others_cpu: the share of the CPUs other processes took while the figure was
            timed (0.2 or more: measured on a busy machine); ``None``: not measured.
    """

    study: str
    number: int | None
    plan: dict[str, Any]
    speedup: float | None
    lower: float | None
    upper: float | None
    rounds: int | None
    accuracy: float | None
    floor: str
    speed_model: str | None
    machine: str
    date: str
    verdict: str
    others_cpu: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json_ready(asdict(self))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeptTrial:
        known = {f.name for f in fields(cls)}
        return cls(**{k: data.get(k) for k in known})  # type: ignore[arg-type]

    @classmethod
    def from_study(cls, study: optuna.Study) -> KeptTrial | None:
        """What the last finished search on ``study`` kept (``None``: no record yet)."""
        stored = study.user_attrs.get(KEPT_ATTR)
        if not isinstance(stored, dict):
            return None
        return cls.from_dict(stored)

    def record(self, study: optuna.Study) -> None:
        study.set_user_attr(KEPT_ATTR, self.to_dict())


def machine_text(device: torch.device | None = None) -> str:
    """``host, CPU (N threads) or GPU name, torch X.Y``: where a speed was measured."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        where = torch.cuda.get_device_name(device)
    else:
        where = (
            f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        )
    return f"{platform.node()}, {where}, torch {torch.__version__}"


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_kept(
    studies: Mapping[str, optuna.Study],
    *,
    plan: dict[str, Any],
    number: int | None,
    speedup: float | None,
    confirmation: Mapping[str, Any] | None,
    accuracy: float | None,
    floor: str,
    speed_model: str | None,
    device: torch.device | None,
    verdict: str,
) -> KeptTrial | None:
    """Write what was kept into every study of the search; the record of the first study."""
    first: KeptTrial | None = None
    for study in studies.values():
        kept = KeptTrial(
            study=study.study_name,
            number=number if len(studies) == 1 else None,
            plan=plan,
            speedup=speedup,
            lower=None if confirmation is None else confirmation.get("lower"),
            upper=None if confirmation is None else confirmation.get("upper"),
            rounds=None if confirmation is None else confirmation.get("rounds"),
            others_cpu=None if confirmation is None else confirmation.get("others_cpu"),
            accuracy=accuracy,
            floor=floor,
            speed_model=speed_model,
            machine=machine_text(device),
            date=now_text(),
            verdict=verdict,
        )
        kept.record(study)
        first = first or kept
    return first
