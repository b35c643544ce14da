"""What a tuner found, as the seed's API and the results files show it (a mixin of the tuner).

Every figure comes from one :class:`~sketchtune._search._best.Decision` (the kept plan,
its confirmed speedup, its verdict) and the studies' trials judged against today's
floor: nothing is stored twice.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import optuna

from sketchtune._search._best import Decision
from sketchtune._search._results import (
    read_results,
    seed_layer_results,
    seed_results,
    study_records,
    write_results,
)
from sketchtune.plan import SketchPlan
from sketchtune.results import TrialRecord, format_model_tree, records_dataframe

if TYPE_CHECKING:
    from torch import nn

    from sketchtune._search._judge import Judge
    from sketchtune._search._studies import StudyLayout, StudySpec
    from sketchtune.evaluate import AccuracyFloor

__all__ = ["TuningOutcome"]


class TuningOutcome:
    """The results half of :class:`~sketchtune.tuner.SKAutoTuner`: read-only views and files."""

    model: nn.Module
    decision: Decision | None
    strategy: str | None
    dense_accuracy: float | None
    _records: list[TrialRecord] | None
    _layout: StudyLayout
    _studies: list[StudySpec]
    _optuna_studies: dict[str, optuna.Study]
    _judge: Judge

    @property
    def floor(self) -> AccuracyFloor:
        """The accuracy floor (resolved against the dense accuracy once it is measured)."""
        return self._judge.floor

    @property
    def best_plan(self) -> SketchPlan | None:
        """The kept plan (``None`` before ``tune()``; empty when the model stays dense)."""
        return None if self.decision is None else self.decision.plan

    @property
    def best_accuracy(self) -> float | None:
        return None if self.decision is None else self.decision.accuracy

    @property
    def best_speedup(self) -> float | None:
        """The kept plan's confirmed speedup (the FLOP model's figure with ``"flops"``)."""
        return None if self.decision is None else self.decision.speedup

    @property
    def confirmation(self) -> dict[str, Any] | None:
        return None if self.decision is None else self.decision.confirmation

    @property
    def combination_log(self) -> list[dict[str, Any]]:
        return [] if self.decision is None else self.decision.combination_log

    @property
    def confirmation_log(self) -> list[dict[str, Any]]:
        return [] if self.decision is None else self.decision.confirmation_log

    @property
    def verdict(self) -> str | None:
        """One line: what the last tune() kept, or why the model stays dense."""
        return None if self.decision is None else self.decision.verdict

    @property
    def best_params(self) -> dict[str, dict[str, Any]]:
        """The seed's form, as :meth:`tune` returns it: ``{layer: {"params", ...}}``.

        Every tuned layer is a key; ``best_params[layer]["params"]`` is the kept
        ``{param: value}``, or ``None`` for a layer the kept plan leaves dense. Each entry
        also holds ``copy_weights``, ``accuracy``, ``speed`` and ``score`` of the kept
        plan, and ``trial``: Optuna's number of the trial that chose the layer's
        parameters in its study (``None`` when left dense; the log shows ``trial + 1``).
        :attr:`best_plan` holds the kept plan itself (``{layer: LayerPlan}``), and
        :attr:`kept` the trial with its confirmed figures.
        Empty before ``tune()``.
        """
        if self.best_plan is None:
            return {}
        return self.layer_results

    @property
    def layer_results(self) -> dict[str, dict[str, Any]]:
        """What :meth:`tune` returns (:attr:`best_params`)."""
        copy_weights = {name: g.copy_weights for g in self._layout.groups for name in g.names}
        decision = self.decision or Decision(SketchPlan())
        score = decision.speedup if decision.speedup is not None else decision.accuracy
        kept = {"accuracy": decision.accuracy, "speed": decision.speed, "score": score}
        results = seed_layer_results(list(copy_weights), decision.plan, kept)
        for name, entry in results.items():
            entry["copy_weights"] = copy_weights[name]
            entry["trial"] = decision.layer_trials.get(name)
        return results

    @property
    def results(self) -> dict[str, list[dict[str, Any]]]:
        """The seed's record of trials: each study's label -> its trials, in step with the dataframe.

        A label is the layer's name, ``"a+b+c"`` for a joint group (every member
        named) or ``"global"``; each trial is ``{"params", "accuracy", "speed", "score"}``.
        """
        labels = {g.key: "+".join(g.names) for g in self._layout.groups}
        return seed_results(self.records, labels)

    def get_best_params(self) -> dict[str, dict[str, Any]]:
        """Same as :attr:`best_params`."""
        return self.best_params

    @property
    def records(self) -> list[TrialRecord]:
        """Every trial of every study (including resumed ones), as rows of the results table."""
        if self._records is None:
            self._records = study_records(self._studies, self._optuna_studies, self.floor)
        return self._records

    def get_results_dataframe(self) -> Any:
        """A pandas DataFrame, one row per trial.

        Columns: ``layer_name``, one per parameter, ``accuracy``, ``speed``,
        ``speedup``, ``score`` (``-inf`` when infeasible), ``feasible``,
        ``trial``, ``state``, ``duration`` (seconds) and ``reason`` (why a trial failed).
        """
        return records_dataframe(self.records)

    def print_model_tree(self) -> None:
        """Print the model with its sketched layers marked."""
        print(format_model_tree(self.model))

    def save_tuning_results(self, path: str | os.PathLike[str]) -> None:
        """Write the results (every trial, the floor, the best plan) as JSON (never pickle)."""
        write_results(
            path,
            strategy=self.strategy,
            dense_accuracy=self.dense_accuracy,
            floor=self.floor,
            records=self.records,
            decision=self.decision,
        )

    def load_tuning_results(self, path: str | os.PathLike[str]) -> None:
        """Read results written by :meth:`save_tuning_results` (no code is executed)."""
        loaded = read_results(path, layers=self._layout.dense)
        self._records = loaded.records
        self.decision = loaded.decision
        self._judge.set_floor(loaded.floor)
        self.dense_accuracy = loaded.dense_accuracy
