"""``summary.md``: dense vs tuned."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields

from sketchtune._redact import redact
from sketchtune._report._mark import KeptMark
from sketchtune.plan import SketchPlan

__all__ = ["RunSummary"]


@dataclass
class RunSummary:
    """Dense vs tuned, for the end-of-run table and ``summary.md``."""

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
    #: the kept trial(s) and their figures, marked in results.csv
    kept: KeptMark | None = None

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
            lines += ["| layer | sketched as | parameters |", "|---|---|---|"]
            for name, layer in self.plan.items():
                params = ", ".join(f"{k}={v}" for k, v in layer.params.items())
                lines.append(f"| {name} | {layer.type} | {params} |")
        else:
            lines.append(
                f"Nothing was kept: {self.verdict}"
                if self.verdict
                else "No sketch kept the floor and ran faster: the model stays dense."
            )
        return "\n".join(lines)

    def dashboard_hint(self) -> str:
        if self.storage and "://" in self.storage:
            # quoted for a shell: a path may hold spaces, quotes or `$`
            return f"Browse the study: optuna-dashboard {shlex.quote(str(redact(self.storage)))}"
        return "The study is in memory; pass storage='sqlite:///tune.db' to browse it with optuna-dashboard."
