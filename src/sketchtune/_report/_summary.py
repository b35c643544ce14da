"""``summary.md``: dense vs tuned, how the speedup was measured, where the kept trial is."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, fields

from sketchtune._redact import redact
from sketchtune._report._mark import KeptMark
from sketchtune._search._confirm import busy_note
from sketchtune.plan import SketchPlan
from sketchtune.registry import kind_named

__all__ = ["DASHBOARD_NOTE", "RunSummary", "TimingSetup"]

#: what optuna-dashboard misreads, and where the facts are (summary.md and the README say it)
DASHBOARD_NOTE = (
    "optuna-dashboard (0.21.0 and its main branch) reads a trial's feasibility from the "
    "system attribute `constraints`, the list Optuna 4 samplers' `constraints_func` wrote. "
    'Optuna 5 stores `trial.set_constraint("accuracy", v)`, which sketchtune uses, as '
    "`constraints:accuracy` (Optuna reads both forms), so the dashboard shows every trial as "
    "feasible: a trial below the floor is an ordinary COMPLETE trial with a value below every "
    "feasible one (-1 minus its shortfall when speed is timed). Feasibility is in results.csv "
    "(`feasible`), in each trial's `sketchtune` user attribute, and in Optuna's "
    "`trial.constraints` (<= 0: feasible)."
)


@dataclass(frozen=True)
class TimingSetup:
    """How speed was timed: what one timing slice runs, where.

    Attributes:
        batches_per_slice: batches in one slice (each model of a round times one slice).
        batches: batches read once for timing (the slices cycle through them).
        batch_size: samples in a batch.
        device: where the model ran (``"cpu"``, ``"cuda:0"``).
        dtype: the model's parameter dtype.
        precision: the Trainer's precision setting (``"32-true"``, ``"bf16-mixed"``).
    """

    batches_per_slice: int
    batches: int
    batch_size: int
    device: str
    dtype: str
    precision: str | None = None

    def describe(self) -> str:
        precision = f", precision {self.precision}" if self.precision else ""
        return (
            f"each model's timing slice runs {self.batches_per_slice} batch(es) of "
            f"{self.batch_size} samples ({self.batches} batches read once and cycled), on "
            f"{self.device}, {self.dtype}{precision}"
        )


@dataclass
class RunSummary:
    """Dense vs tuned, for the end-of-run table and ``summary.md``.

    ``kept`` (the kept trial and its confirmed figures), ``timing`` (how speed was
    timed) and ``speed_model`` feed the paragraphs below the table; without them the
    summary is the table alone.
    """

    monitor: str
    floor: str
    dense_accuracy: float | None
    tuned_accuracy: float | None
    dense_throughput: float | None
    tuned_throughput: float | None
    dense_weights: int
    tuned_weights: int
    plan: SketchPlan
    trials: int
    feasible: int
    storage: str | None
    study_name: str | None
    confirmed_speedup: float | None = None
    #: what was kept, or why the model stays dense (the tuner's ``verdict``)
    verdict: str | None = None
    kept: KeptMark | None = None
    timing: TimingSetup | None = None
    #: ``"measured"``, ``"flops"`` or ``None`` (accuracy only): what a trial's speedup is
    speed_model: str | None = None

    def __repr__(self) -> str:
        # the storage only as it may be shown: a password never reaches a log or a notebook
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["storage"] = redact(self.storage)
        return f"RunSummary({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def speedup(self) -> float | None:
        """The confirmed speedup (median per-round ratio), else the ratio of the throughputs."""
        if self.confirmed_speedup is not None:
            return self.confirmed_speedup
        if self.dense_throughput and self.tuned_throughput:
            return self.tuned_throughput / self.dense_throughput
        return None

    def table(self) -> str:
        """A Markdown table: accuracy, throughput, speedup and weights, then each sketched layer."""

        def num(value: float | None, fmt: str) -> str:
            return "n/a" if value is None else format(value, fmt)

        speedup = self.speedup
        lines = [
            f"| model | {self.monitor} | throughput (samples/s) | speedup | weights (params + buffers) |",
            "|---|---:|---:|---:|---:|",
            f"| dense | {num(self.dense_accuracy, '.4f')} | {num(self.dense_throughput, ',.0f')} | 1.00x "
            f"| {self.dense_weights:,} |",
            f"| tuned | {num(self.tuned_accuracy, '.4f')} | {num(self.tuned_throughput, ',.0f')} "
            f"| {num(speedup, '.2f')}{'x' if speedup is not None else ''} | {self.tuned_weights:,} |",
            "",
            f"Floor {self.floor}; {self.feasible}/{self.trials} trials feasible.",
            "",
        ]
        if self.plan:
            lines += ["| layer | form | sketched as | parameters |", "|---|---|---|---|"]
            for name, layer in self.plan.items():
                params = ", ".join(f"{k}={v}" for k, v in layer.params.items())
                form = kind_named(layer.type).form(layer.params)
                lines.append(f"| {name} | {form} | {layer.type} | {params} |")
        else:
            lines.append(
                f"Nothing was kept: {self.verdict}"
                if self.verdict
                else "No sketch kept the floor and ran faster: the model stays dense."
            )
        return "\n".join(lines)

    def measurement(self) -> str:
        """How the speedup shown was measured (or estimated), in one paragraph."""
        kept = self.kept
        if kept is not None and kept.speedup is not None and kept.confirmed:
            interval = ""
            if kept.lower is not None and kept.upper is not None and math.isfinite(kept.lower):
                interval = f", 95% interval {kept.lower:.2f}x-{kept.upper:.2f}x"
            text = (
                f"{kept.speedup:.2f}x is the confirmed median of {kept.rounds} interleaved timing "
                "rounds (each round times the dense and the tuned model back to back, "
                f"alternating which goes first){interval}; the throughputs above are the "
                "medians of the same rounds."
            )
            note = busy_note(kept.lower, kept.upper, kept.others_cpu)
            text += f" {note}" if note else ""
        elif kept is not None and kept.speedup is not None and kept.speed_model == "flops":
            text = (
                f"{kept.speedup:.2f}x is the FLOP model's estimate (the dense model's FLOPs "
                "over the plan's), not a timing."
            )
        elif self.speed_model == "measured":
            text = (
                "Each trial's speedup is the median of interleaved timing rounds against the "
                "dense model (results.csv: `rounds`, `confirmed`)."
            )
        elif self.speed_model == "flops":
            text = "Speedups are the FLOP model's estimates, not timings."
        else:
            return "Speed was not part of the objective (accuracy only)."
        if self.timing is not None and self.speed_model == "measured":
            text += f" Timing: {self.timing.describe()}."
        if kept is not None and kept.machine and kept.confirmed:
            text += f" Confirmed on {kept.machine}, {kept.date}."
        return text

    def kept_text(self) -> str:
        """Which trial was kept and how to read it from the study."""
        kept = self.kept
        if kept is None or not kept.trials:
            if self.plan:  # e.g. per-layer winners joined but not validated (interrupted)
                return (
                    "The kept plan is no single trial's; the study's user attribute "
                    "`sketchtune:kept` records it and the verdict."
                )
            return (
                "No trial was kept; the study's user attribute `sketchtune:kept` records the "
                "verdict."
            )
        if kept.combined:
            parts = "; ".join(
                f"study {label!r}: trial {n + 1} (Optuna number {n})"
                for label, n in kept.trials.items()
            )
            what = f"The kept plan combines the winners of {len(kept.trials)} studies ({parts})"
        else:
            number = next(iter(kept.trials.values()))
            study = kept.study or self.study_name or next(iter(kept.trials))
            what = f"Kept: trial {number + 1} of study {study!r} (Optuna's trial number {number})"
        return (
            f"{what}; results.csv marks it `kept`. The study records it: "
            '`study.user_attrs["sketchtune:kept"]` (`number` is Optuna\'s) has its plan, '
            "figures, machine and date."
        )

    def optuna_text(self) -> str:
        """How Optuna's and optuna-dashboard's views of the study differ from the report."""
        text = (
            "Optuna's `study.best_trial` (and optuna-dashboard's best trial) is the trial with "
            "the highest value told to Optuna: each trial's own figure, which cannot change "
            "once the trial finished."
        )
        if self.speed_model == "measured":
            text += (
                " It can be a figure that was never confirmed, and differ from the kept trial "
                "above."
            )
        return f"{text} {DASHBOARD_NOTE}"

    def dashboard_hint(self) -> str:
        if self.storage and "://" in self.storage:
            # quoted for a shell: a path may hold spaces, quotes or `$`
            return f"Browse the study: optuna-dashboard {shlex.quote(str(redact(self.storage)))}"
        return "The study is in memory; pass storage='sqlite:///tune.db' to browse it with optuna-dashboard."

    def markdown(self, *, notes: bool = True) -> str:
        """``summary.md``: the table, how the speedup was measured, the kept trial, the
        notes on Optuna's and the dashboard's views (``notes``), and the dashboard command
        (last line)."""
        parts = [self.table(), self.measurement(), self.kept_text()]
        if notes:
            parts.append(self.optuna_text())
        return "\n\n".join([*parts, self.dashboard_hint()])
