"""Layer selection: turn a selector into the fully qualified names of sketchable layers.

Selectors (PEFT's ``target_modules`` conventions, plus a dict form):

- a **regex string**, matched against the whole qualified name (``re.fullmatch``):
  ``r"encoder\\.layers\\.\\d+\\.linear1"``;
- a **list of names**, each an exact qualified name or a ``.suffix`` of one:
  ``["fc1", "fc2"]`` also selects ``"block.fc1"``;
- a **dict** with any of ``pattern`` (regex, full match), ``type`` (class, class
  name or list of them), ``contains`` (substring), ``exclude`` (regex or list of
  names), then ``indices`` (positions, negative allowed) or ``range``
  (``[start, stop]`` or ``[start, stop, step]``) into what is left, in model order;
- a **callable** ``(name, module) -> bool``, as torchao's ``filter_fn``.

Only sketchable layers are candidates: those of a registered kind
(:mod:`sketchtune.registry`; built in: ``nn.Linear``, ``nn.Conv2d`` with
groups=1 and zero padding, ``nn.MultiheadAttention``, and transformers'
``Conv1D``). A kind's layer is swapped whole, so its submodules (the
``out_proj`` inside an ``nn.MultiheadAttention``) are never candidates.
A selector that matches nothing, or names a layer that cannot be sketched, is
an error that lists what exists.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

from torch import nn

from sketchtune._validation import warn
from sketchtune.registry import (
    SketchKind,
    kind_of,
    sketch_of,
    supported_types,
    swapped_whole,
    unsupported_reason,
)

__all__ = ["select_layers", "sketchable_layers", "unsupported_layers"]

_DICT_KEYS = ("pattern", "type", "contains", "exclude", "indices", "range")


def sketchable_layers(
    model: nn.Module, *, include_sketched: bool = False
) -> list[tuple[str, nn.Module, SketchKind]]:
    """``(name, module, kind)`` of every sketchable layer of ``model``, in model order.

    With ``include_sketched``, layers that are already sketched are listed too
    (with the kind they came from). Submodules of attention layers and of
    sketched layers are never listed: those are priced and swapped whole.
    """
    found: list[tuple[str, nn.Module, SketchKind]] = []
    inside: list[str] = []  # prefixes whose descendants are not candidates
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        kind = kind_of(module)
        sketched = sketch_of(module) if kind is None else None
        if kind is not None:
            found.append((name, module, kind))
        elif sketched is not None and include_sketched:
            found.append((name, module, sketched[0]))
        if swapped_whole(module):
            inside.append(name + ".")
    return found


def select_layers(model: nn.Module, selector: Any, *, where: str = "layer_names") -> list[str]:
    """Qualified names of the sketchable layers of ``model`` that ``selector`` picks, in model order.

    Args:
        model: the model to search.
        selector: a regex string, a list of names, a dict selector or a callable (see the module doc).
        where: how to name the selector in error messages.

    Raises:
        TypeError: the selector has the wrong type.
        ValueError: it matches nothing, names a layer that cannot be sketched, or is malformed.
    """
    candidates = sketchable_layers(model)
    names = [name for name, _, _ in candidates]
    if isinstance(selector, str):
        chosen = _by_regex(model, names, selector, where)
    elif isinstance(selector, (list, tuple)):
        chosen = _by_names(model, names, selector, where)
    elif isinstance(selector, dict):
        chosen = _by_dict(model, candidates, selector, where)
    elif callable(selector):
        chosen = [name for name, module, _ in candidates if selector(name, module)]
    else:
        raise TypeError(
            f"`{where}` must be a regex string, a list of layer names, a dict selector or a "
            f"callable, got {selector!r} ({type(selector).__name__})."
        )
    if not chosen:
        raise ValueError(
            f"`{where}`={selector!r} matched no sketchable layer (no layer names to tune). "
            f"{_listing(candidates)}"
        )
    skipped = _also_matched(model, selector)
    if skipped:
        warn(f"`{where}`={selector!r} {_skipped_text(skipped)}", UserWarning)
    return chosen


def unsupported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers of ``model`` that no kind sketches, in model order.

    A layer here is a module of a registered kind that declined it (a grouped
    convolution), or a leaf module that holds a weight matrix (an ``Embedding``,
    an ``nn.Conv1d``, a ``Conv1D`` while transformers is not imported). Modules
    inside a sketchable or sketched layer are not listed.
    """
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if swapped_whole(module):
            inside.append(name + ".")
            if kind_of(module) is None and sketch_of(module) is None:
                found.append((name, module))
        elif next(module.children(), None) is None and any(
            p.dim() >= 2 for p in module.parameters(recurse=False)
        ):
            found.append((name, module))
    return found


def _also_matched(model: nn.Module, selector: Any) -> list[tuple[str, nn.Module]]:
    """The layers that ``selector`` matches but that cannot be sketched (so stay dense)."""
    others = unsupported_layers(model)
    if isinstance(selector, str):
        regex = re.compile(selector)
        return [(n, m) for n, m in others if regex.fullmatch(n)]
    if isinstance(selector, (list, tuple)):
        return [(n, m) for n, m in others if any(_matches_name(n, str(k)) for k in selector)]
    if isinstance(selector, dict):
        filters = {k: v for k, v in selector.items() if k not in ("indices", "range")}
        placeholder = cast(SketchKind, None)
        kept = _by_dict(model, [(n, m, placeholder) for n, m in others], filters, "selector")
        return [(n, m) for n, m in others if n in kept]
    return [(n, m) for n, m in others if _accepts(selector, n, m)]


def _accepts(selector: Any, name: str, module: nn.Module) -> bool:
    try:
        return bool(selector(name, module))
    except Exception:  # a filter written for sketchable layers may not expect these
        return False


def _skipped_text(skipped: list[tuple[str, nn.Module]]) -> str:
    """One line: how many, which types, why, e.g. ``also matches 2 ... : 2 Embedding (...)``."""
    by_type: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in skipped:
        by_type.setdefault(type(module).__name__, []).append((name, module))
    parts = [
        f"{len(items)} {type_name} (e.g. {items[0][0]!r}: {unsupported_reason(items[0][1])})"
        for type_name, items in by_type.items()
    ]
    return (
        f"also matches {len(skipped)} layer(s) that cannot be sketched and stay dense: "
        f"{'; '.join(parts)}."
    )


def _compile(pattern: Any, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise TypeError(f"`{where}` pattern must be a string, got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"`{where}`={pattern!r} is not a valid regular expression: {exc}."
        ) from None


def _by_regex(model: nn.Module, names: list[str], pattern: str, where: str) -> list[str]:
    regex = _compile(pattern, where)
    chosen = [n for n in names if regex.fullmatch(n)]
    if not chosen:
        _explain_unsupported(
            model, [n for n, _ in model.named_modules() if n and regex.fullmatch(n)], where
        )
    return chosen


def _matches_name(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _by_names(model: nn.Module, names: list[str], keys: Sequence[Any], where: str) -> list[str]:
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(
                f"`{where}` must list layer names as strings, got {key!r} ({type(key).__name__})."
            )
    picked = {n for n in names if any(_matches_name(n, key) for key in keys)}
    for key in keys:
        if not any(_matches_name(n, key) for n in names):
            existing = [n for n, _ in model.named_modules() if n and _matches_name(n, key)]
            _explain_unsupported(model, existing, where)
            raise ValueError(
                f"`{where}` names {key!r}, which is not a layer of the model. "
                f"{_listing(sketchable_layers(model))}"
            )
    return [n for n in names if n in picked]


def _explain_unsupported(model: nn.Module, existing: list[str], where: str) -> None:
    """Raise a precise error when the selector named modules that exist but cannot be sketched."""
    if not existing:
        return
    modules = dict(model.named_modules())
    name = existing[0]
    module = modules[name]
    if list(module.children()) and not swapped_whole(module):
        suggestion = re.escape(name) + r"\..*"
        raise ValueError(
            f"`{where}` selects {name!r}, a {type(module).__name__} container; select the layers "
            f"inside it, e.g. the regex {suggestion!r}."
        )
    raise ValueError(
        f"`{where}` selects {name!r}, a {type(module).__name__}, which is not supported for "
        f"sketching: {unsupported_reason(module)}. {_listing(sketchable_layers(model))}"
    )


def _type_matches(module: nn.Module, types: list[Any]) -> bool:
    for t in types:
        if isinstance(t, type):
            if isinstance(module, t):
                return True
        elif isinstance(t, str):
            short = t.rsplit(".", 1)[-1]
            if any(cls.__name__ == short for cls in type(module).__mro__):
                return True
    return False


def _by_dict(
    model: nn.Module,
    candidates: list[tuple[str, nn.Module, SketchKind]],
    spec: dict[str, Any],
    where: str,
) -> list[str]:
    unknown = sorted(set(spec) - set(_DICT_KEYS))
    if unknown:
        raise ValueError(
            f"`{where}` dict has unknown key(s) {unknown}; valid keys: {list(_DICT_KEYS)}."
        )
    if "indices" in spec and "range" in spec:
        raise ValueError(f"`{where}` dict may have `indices` or `range`, not both; got {spec!r}.")
    items = list(candidates)
    if "pattern" in spec:
        regex = _compile(spec["pattern"], f"{where}.pattern")
        items = [c for c in items if regex.fullmatch(c[0])]
    if "type" in spec:
        raw = spec["type"]
        types = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        for t in types:
            if not isinstance(t, (type, str)):
                raise TypeError(f"`{where}.type` must be a class or a class name, got {t!r}.")
        items = [c for c in items if _type_matches(c[1], types)]
    if "contains" in spec:
        needle = spec["contains"]
        if not isinstance(needle, str):
            raise TypeError(f"`{where}.contains` must be a string, got {needle!r}.")
        items = [c for c in items if needle in c[0]]
    if "exclude" in spec:
        exclude = spec["exclude"]
        if isinstance(exclude, str):
            regex = _compile(exclude, f"{where}.exclude")
            items = [c for c in items if not regex.fullmatch(c[0])]
        elif isinstance(exclude, (list, tuple)):
            items = [c for c in items if not any(_matches_name(c[0], str(k)) for k in exclude)]
        else:
            raise TypeError(
                f"`{where}.exclude` must be a regex string or a list of names, got {exclude!r}."
            )
    names = [c[0] for c in items]
    if "indices" in spec:
        raw = spec["indices"]
        indices = [raw] if isinstance(raw, int) else raw
        if not isinstance(indices, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise TypeError(f"`{where}.indices` must be an int or a list of ints, got {raw!r}.")
        for i in indices:
            if not -len(names) <= i < len(names):
                raise ValueError(
                    f"`{where}.indices` has {i}, but only {len(names)} layer(s) match before indexing: {names}."
                )
        picked = {names[i] for i in indices}
        names = [n for n in names if n in picked]
    elif "range" in spec:
        bounds = spec["range"]
        if (
            not isinstance(bounds, (list, tuple))
            or len(bounds) not in (2, 3)
            or not all(
                b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds
            )
        ):
            raise TypeError(
                f"`{where}.range` must be [start, stop] or [start, stop, step] of ints, got {bounds!r}."
            )
        names = names[slice(*bounds)]
    return names


def _listing(candidates: Sequence[tuple[str, nn.Module, SketchKind]], limit: int = 8) -> str:
    if not candidates:
        return f"The model has no sketchable layer ({', '.join(supported_types())})."
    shown = ", ".join(
        f"{name!r} ({kind.describe(module)})" for name, module, kind in candidates[:limit]
    )
    more = f", ... ({len(candidates)} in all)" if len(candidates) > limit else ""
    return f"Sketchable layers: {shown}{more}."
