"""The fingerprint of a search, stored in its Optuna study: a resume must search the same thing.

A study resumed with other layers, another search space, strategy, metric or speed
model would mix trials of different searches (and return plans for layers that are
no longer selected, or FLOP figures beside measured ones); the fingerprint turns that
into an error before any work. The selected layers' weights are fingerprinted too
(a sample of each tensor): another model with the same dense score must not inherit
the first model's trials. The floor is not part of it: a resumed study's trials are
re-judged against today's floor, and the change is said in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from sketchtune._redact import redact
from sketchtune._search._studies import StudyLayout, StudySpec
from sketchtune._validation import warn
from sketchtune.evaluate import AccuracyFloor

__all__ = [
    "check_dense_record",
    "check_fingerprint",
    "check_fingerprints",
    "check_weights",
    "fingerprint",
    "note_floor_change",
    "weights_digest",
]

_KEY = FINGERPRINT_ATTR = "sketchtune:fingerprint"
_DENSE = "sketchtune:dense_accuracy"
_WEIGHTS = "sketchtune:weights"
_FLOOR = "sketchtune:floor"
_VERSION = 2
_SAMPLES = 1024  # values sampled from each weight tensor for its digest


def fingerprint(
    spec: StudySpec,
    layout: StudyLayout,
    *,
    strategy: str | None,
    metric: str | None,
    mode: str,
    speed_model: str | None = None,
) -> dict[str, Any]:
    """What ``spec``'s study searches: layers (with their sizes), spaces, strategy, metric,
    mode and speed model (``"measured"``, ``"flops"`` or ``None``)."""
    data = {
        "version": _VERSION,
        "strategy": strategy,
        "metric": metric,
        "mode": mode,
        "speed_model": speed_model,
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
    speed_model: str | None = None,
) -> None:
    """:func:`check_fingerprint` for every study of a search, before any work."""
    for spec in specs:
        expected = fingerprint(
            spec, layout, strategy=strategy, metric=metric, mode=mode, speed_model=speed_model
        )
        check_fingerprint(studies[spec.label], expected, storage=storage)


def weights_digest(model: nn.Module) -> dict[str, str]:
    """A short digest of each tensor of ``model``'s state: its shape and up to 1024 values.

    Cheap at any size (a strided sample, no pass over the whole tensor), and two trained
    models differ in it: every weight tensor changes when it is trained. Every tensor
    counts, not only the selected layers': any of them changes the accuracies.
    """
    digests: dict[str, str] = {}
    for key, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta or not tensor.numel():
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        sample = flat[::step][:_SAMPLES].to("cpu", torch.float32)
        h = hashlib.sha256(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
        digests[key] = h.hexdigest()[:12]
    return digests


def check_weights(
    studies: Mapping[str, optuna.Study], digests: Mapping[str, str], *, storage: object
) -> None:
    """Record the model's weight digests in new studies; refuse studies of another model.

    Raises:
        ValueError: a resumed study was made for a model whose selected layers differ.
    """
    for study in studies.values():
        stored = study.user_attrs.get(_WEIGHTS)
        if not isinstance(stored, dict):
            study.set_user_attr(_WEIGHTS, dict(digests))
            continue
        changed = sorted(n for n in set(stored) | set(digests) if stored.get(n) != digests.get(n))
        if changed:
            shown = ", ".join(repr(n) for n in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise ValueError(
                f"study {study.study_name!r} in {redact(storage)!r} was made for another model: "
                f"the weights of {shown}{more} differ from this model's, so its trials (their "
                "accuracies, their kept plan) describe that model, not this one. Pass a new "
                "study_name to tune this model (or delete the old study: optuna delete-study "
                "--study-name NAME --storage URL)."
            )


def note_floor_change(
    studies: Mapping[str, optuna.Study],
    floor: AccuracyFloor,
    feasible_then_now: Callable[[optuna.Study, AccuracyFloor], tuple[int, int]],
    say: Callable[[str], None],
) -> None:
    """Record today's floor; when a resumed study was searched against another, say so.

    ``feasible_then_now(study, old)`` counts the finished trials that kept the old floor
    and that keep today's (every trial is re-judged against today's floor).
    """
    for study in studies.values():
        stored = study.user_attrs.get(_FLOOR)
        current = {"value": floor.value, "mode": floor.mode}
        if isinstance(stored, dict) and stored != current:
            old = AccuracyFloor(stored.get("value"), stored.get("mode", floor.mode))
            finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            then, now = feasible_then_now(study, old)
            say(
                f"study {study.study_name!r} was searched against the floor {old.describe()}; "
                f"its {finished} finished trial(s) are re-judged against today's floor "
                f"{floor.describe()}: {then} kept the old floor, {now} keep today's."
            )
        if stored != current:
            study.set_user_attr(_FLOOR, current)


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
        for what in ("strategy", "metric", "mode", "speed_model")
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
