"""Opening a search's studies and checking what they already hold against this search.

A study may be new, or hold trials of an earlier run, another worker or another
machine. Before any work: the search it was made for (fingerprint), the model (a
digest of the selected layers' weights). After the baseline: the dense score, and the
floor (a changed floor re-judges the stored trials, said in one line). A study that
already holds trials is said to be reused, with how to get more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optuna
from torch import nn

from sketchtune._redact import redact
from sketchtune._search._events import Events
from sketchtune._search._fingerprint import (
    FINGERPRINT_ATTR as _FINGERPRINT,
)
from sketchtune._search._fingerprint import (
    check_dense_record,
    check_fingerprint,
    check_fingerprints,
    check_weights,
    fingerprint,
    note_floor_change,
    weights_digest,
)
from sketchtune._search._results import study_records
from sketchtune._search._studies import StudyLayout, StudySpec
from sketchtune.evaluate import AccuracyFloor
from sketchtune.search import OptunaSearch

__all__ = ["check_baseline", "check_stored_searches", "open_studies"]


def open_studies(
    search: OptunaSearch,
    specs: Sequence[StudySpec],
    layout: StudyLayout,
    model: nn.Module,
    events: Events,
    *,
    strategy: str | None,
    metric: str | None,
    mode: str,
    speed_model: str | None,
) -> dict[str, optuna.Study]:
    """The search's studies by label, each checked to hold this search of this model.

    Raises:
        ValueError: a resumed study was made for another search or another model.
    """
    opened = search.open_studies([s.key for s in specs])
    studies = {s.label: study for s, study in zip(specs, opened, strict=True)}
    check_fingerprints(
        studies,
        specs,
        layout,
        strategy=strategy,
        metric=metric,
        mode=mode,
        storage=search.storage,
        speed_model=speed_model,
    )
    check_weights(studies, weights_digest(model), storage=search.storage)
    _note_reused(studies, search, events)
    return studies


def check_baseline(
    studies: Mapping[str, optuna.Study],
    specs: Sequence[StudySpec],
    dense_accuracy: float,
    floor: AccuracyFloor,
    events: Events,
) -> None:
    """The dense score a resumed study recorded must match; a changed floor is said."""
    check_dense_record(studies, dense_accuracy)
    by_name = {study.study_name: label for label, study in studies.items()}

    def feasible_then_now(study: optuna.Study, old: AccuracyFloor) -> tuple[int, int]:
        spec = [s for s in specs if s.label == by_name[study.study_name]]
        then = study_records(spec, studies, old)
        now = study_records(spec, studies, floor)
        return sum(r.feasible for r in then), sum(r.feasible for r in now)

    note_floor_change(studies, floor, feasible_then_now, events.note)


def _note_reused(studies: Mapping[str, optuna.Study], search: OptunaSearch, events: Events) -> None:
    """One line when the studies already hold trials: they are reused, and how to get more."""
    counted = {label: search.counted_trials(s) for label, s in studies.items()}
    held = sum(counted.values())
    if not held:
        return
    budget = search.n_trials
    left = sum(max(0, budget - n) for n in counted.values()) if budget is not None else None
    names = sorted({s.study_name for s in studies.values()})
    shown = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"
    in_memory = search.storage is None or isinstance(
        search.storage, optuna.storages.InMemoryStorage
    )
    where = "in memory" if in_memory else f"in {redact(search.storage)}"
    if left == 0:
        plan = "its budget is used up, so it runs no trial and its result is reused"
    else:
        plan = f"they are reused and {left} more will run"
    events.note(
        f"study {shown!r} {where} already has {held} trial(s) (n_trials={budget}): {plan}. "
        "For more trials raise n_trials; to start over pass a new study_name."
    )


def check_stored_searches(
    search: OptunaSearch,
    specs: Sequence[StudySpec],
    layout: StudyLayout,
    *,
    strategy: str | None,
    metric: str | None,
    mode: str,
    speed_model: str | None,
) -> None:
    """Refuse, before any work, an existing study of the same name made for another search.

    Only studies that already exist are read (nothing is created); the model's weights
    are checked when the search starts, since training may still change them.

    Raises:
        ValueError: as :func:`open_studies` would, but before training.
    """
    storage = search.open_storage()
    if storage is None:
        return
    existing = set(optuna.study.get_all_study_names(storage))
    for spec in specs:
        name = search.study_name_for(spec.key)
        if name not in existing:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        if study.user_attrs.get(_FINGERPRINT) is None:
            continue  # an older sketchtune's study: checked (and warned about) when it is opened
        expected = fingerprint(
            spec, layout, strategy=strategy, metric=metric, mode=mode, speed_model=speed_model
        )
        check_fingerprint(study, expected, storage=search.storage)
