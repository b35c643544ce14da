"""The fingerprint of a search, stored in its Optuna study: a resume must search the same thing.

A study resumed with other layers, another search space, strategy or metric
would mix trials of different searches (and return plans for layers that are
no longer selected); the fingerprint turns that into an error before any work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from sketchtune._redact import redact
from sketchtune._search._studies import StudyLayout, StudySpec
from sketchtune._validation import warn

__all__ = ["check_dense_record", "check_fingerprint", "check_fingerprints", "fingerprint"]

_KEY = "sketchtune:fingerprint"
_DENSE = "sketchtune:dense_accuracy"
_VERSION = 1


def fingerprint(
    spec: StudySpec, layout: StudyLayout, *, strategy: str | None, metric: str | None, mode: str
) -> dict[str, Any]:
    """What ``spec``'s study searches: layers (with their sizes), spaces, strategy, metric, mode."""
    data = {
        "version": _VERSION,
        "strategy": strategy,
        "metric": metric,
        "mode": mode,
        "layers": {
            name: group.kind.describe(layout.dense[name])
            for group in spec.groups
            for name in group.names
        },
        "groups": {
            group.key: {
                "layers": list(group.names),
                "kind": group.kind.name,
                "copy_weights": group.copy_weights,
                "space": {p: s.to_dict() for p, s in group.space.items()},
            }
            for group in spec.groups
        },
    }
    normal: dict[str, Any] = json.loads(json.dumps(data))  # as a storage gives it back
    return normal


def check_fingerprint(study: optuna.Study, expected: dict[str, Any], *, storage: object) -> None:
    """Store ``expected`` in a new study; refuse a resumed one that searched something else.

    Raises:
        ValueError: the study was created for another search (the message says what changed).
    """
    stored = study.user_attrs.get(_KEY)
    if stored is None:
        if study.get_trials(deepcopy=False):
            warn(
                f"study {study.study_name!r} holds trials but no sketchtune fingerprint (an older "
                "sketchtune made it): it cannot be checked against this search; resuming anyway."
            )
        study.set_user_attr(_KEY, expected)
        return
    if stored == expected:
        return
    changes = _differences(stored, expected)
    raise ValueError(
        f"study {study.study_name!r} in {redact(storage)!r} was created for a different search, "
        f"so its trials cannot be resumed here: {'; '.join(changes[:6])}"
        + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        + ". Use a new study_name for this search (or delete the old study: optuna delete-study "
        "--study-name NAME --storage URL)."
    )


def check_fingerprints(
    studies: Mapping[str, optuna.Study],
    specs: Sequence[StudySpec],
    layout: StudyLayout,
    *,
    strategy: str | None,
    metric: str | None,
    mode: str,
    storage: object,
) -> None:
    """:func:`check_fingerprint` for every study of a search, before any work."""
    for spec in specs:
        expected = fingerprint(spec, layout, strategy=strategy, metric=metric, mode=mode)
        check_fingerprint(studies[spec.label], expected, storage=storage)


def check_dense_record(studies: Mapping[str, optuna.Study], measured: float) -> None:
    """Record the dense accuracy in new studies; refuse resumed ones that recorded another.

    Raises:
        ValueError: the dense model scores differently from when the study was created.
    """
    for study in studies.values():
        stored = study.user_attrs.get(_DENSE)
        if stored is None:
            study.set_user_attr(_DENSE, measured)
        elif not math.isclose(measured, float(stored), rel_tol=1e-4, abs_tol=1e-6):
            raise ValueError(
                f"the dense model scores {measured:.6g} now, but study {study.study_name!r} "
                f"recorded {float(stored):.6g} when it was created: the model, the validation "
                "data or the accuracy function changed since, so its trials do not describe "
                "this search. Use a new study_name, or resume with the same model and evaluation."
            )


def _differences(stored: Any, expected: dict[str, Any]) -> list[str]:
    if not isinstance(stored, dict) or stored.get("version") != _VERSION:
        return [f"its fingerprint has another format ({str(stored)[:60]!r})"]
    changes = [
        f"{what} was {stored.get(what)!r}, is {expected[what]!r}"
        for what in ("strategy", "metric", "mode")
        if stored.get(what) != expected[what]
    ]
    old, new = stored.get("layers", {}), expected["layers"]
    gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    if gone:
        changes.append(f"layers no longer selected: {gone}")
    if added:
        changes.append(f"layers newly selected: {added}")
    changes.extend(
        f"layer {name!r} was {old[name]}, is {new[name]}"
        for name in sorted(set(old) & set(new))
        if old[name] != new[name]
    )
    old_groups, new_groups = stored.get("groups", {}), expected["groups"]
    for key in sorted(set(old_groups) & set(new_groups)):
        before, after = old_groups[key], new_groups[key]
        if before.get("space") != after["space"]:
            changes.append(
                f"the search space of {key!r} was {before.get('space')}, is {after['space']}"
            )
        elif before != after:
            changes.append(f"the settings of {key!r} changed ({before} -> {after})")
    return changes or ["its recorded search differs"]
