"""The search variants, one function each: the planned global search, or the sampler's studies.

``strategy="global"`` runs :func:`~sketchtune._planner.run_planned_study` on its
single study (predicted frontier, bisected with real trials, then refined);
``"sampler"``, ``"separate"`` and ``"joint"`` let the Optuna sampler search each
study, warm-started with its most accurate plan.
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna

from sketchtune._planner import Planner, observed_layers, run_planned_study
from sketchtune._search._best import BestTracker
from sketchtune._search._builder import PlanBuilder
from sketchtune._search._events import Events
from sketchtune._search._judge import Judge
from sketchtune._search._objective import run_study, warm_start
from sketchtune._search._studies import StudyLayout
from sketchtune.search import OptunaSearch

__all__ = ["observed_layers_for", "run_search"]


def observed_layers_for(strategy: str | None, layout: StudyLayout) -> tuple[list[str], list[str]]:
    """Layers whose input statistics / first call the dense baseline records, for ``strategy``."""
    if strategy == "global":
        return observed_layers(layout)
    return layout.layers_to_calibrate(), []


def run_search(
    strategy: str | None,
    layout: StudyLayout,
    studies: Mapping[str, optuna.Study],
    judge: Judge,
    builder: PlanBuilder,
    search: OptunaSearch,
    best: BestTracker,
    *,
    seed: int,
    dense_accuracy: float | None,
    deadline: float | None,
    events: Events,
) -> Planner | None:
    """Run every study of ``layout`` to its budget; the planner of a global search, else ``None``."""
    if strategy == "global":
        spec = layout.specs[0]
        return run_planned_study(
            spec,
            studies[spec.label],
            layout,
            judge,
            builder,
            search,
            best,
            seed=seed,
            dense_accuracy=dense_accuracy,
            deadline=deadline,
            events=events,
        )
    warm_start(search, layout, studies)
    left = [
        search.remaining(studies[spec.label].get_trials(deepcopy=False)) for spec in layout.specs
    ]
    total = None if any(n is None for n in left) else sum(n or 0 for n in left)
    with events.phase("trials", total, "trial"):
        for spec in layout.specs:
            run_study(
                spec,
                studies[spec.label],
                layout,
                judge,
                search,
                best,
                dense_accuracy=dense_accuracy,
                deadline=deadline,
                events=events,
            )
    return None
