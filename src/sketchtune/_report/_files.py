"""Writing the report's files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sketchtune._atomic import write_text_atomic
from sketchtune._report._plots import _pyplot, plot_history, plot_pareto
from sketchtune._report._summary import RunSummary
from sketchtune._report._table import results_table

if TYPE_CHECKING:
    from sketchtune.results import TrialRecord

__all__ = ["write_report"]


def write_report(
    out_dir: str | os.PathLike[str],
    summary: RunSummary,
    records: Sequence[TrialRecord],
    *,
    floor: float | None = None,
) -> dict[str, str]:
    """Write ``results.csv``, ``plan.json``, ``summary.md`` and (with matplotlib) the two plots.

    The kept plan is marked in each as ``summary.kept`` describes it: ``results.csv``
    is :func:`~sketchtune.results.results_table`, ``summary.md`` is
    :meth:`RunSummary.markdown`.

    Returns:
        ``{name: path}`` of the files written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        name: os.path.join(os.fspath(out_dir), name)
        for name in ("results.csv", "plan.json", "summary.md")
    }
    table = results_table(records, summary.kept)
    write_text_atomic(paths["results.csv"], table.to_csv(index=False))
    summary.plan.save(paths["plan.json"])
    write_text_atomic(paths["summary.md"], summary.markdown() + "\n")
    try:
        _pyplot()
    except ImportError:
        return paths
    paths["pareto.png"] = os.path.join(os.fspath(out_dir), "pareto.png")
    paths["history.png"] = os.path.join(os.fspath(out_dir), "history.png")
    plot_pareto(
        records,
        paths["pareto.png"],
        floor=floor,
        dense_accuracy=summary.dense_accuracy,
        kept=summary.kept,
    )
    plot_history(records, paths["history.png"], kept=summary.kept)
    return paths
