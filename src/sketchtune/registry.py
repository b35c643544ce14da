"""The open registry of layer kinds: which dense layers can be sketched, and by which kind.

Each dense layer type is one :class:`~sketchtune.kinds.SketchKind` (see
:mod:`sketchtune.kinds`), registered with :func:`register_kind`. Lookups pick
the kind registered for the most specific class in a module's MRO, so a kind
for a subclass of ``nn.Linear`` takes precedence over the Linear kind; a kind
may still decline a particular layer (``SketchKind.unsupported``, e.g. a
grouped convolution). :func:`kind_of` maps a dense module to its kind,
:func:`sketch_of` a sketched module, :func:`kind_named` a sketched type name as
stored in plans.

A kind may also be another *form* of the layers a primary kind sketches
(``SketchKind.form_of``: the int8 form ``Int8Linear`` of ``nn.Linear``, whose
primary kind is ``SKLinear``): it is named in plans and found for its modules,
but never looked up by dense type, so selection and the search see one kind
per layer (which names the form through ``SketchKind.plan_entry``).

Kinds for optional libraries are registered lazily: transformers' ``Conv1D``
kind is registered once ``transformers`` has been imported (a model that holds
a ``Conv1D`` has imported it), or when a plan names ``"SKConv1D"``; sketchtune
itself never imports transformers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from sketchtune.kinds import AttentionKind, Conv2dKind, Int8LinearKind, LinearKind
from sketchtune.kinds._base import BuildAids, CallShapes, Override, Shape, SketchKind, Validator

__all__ = [
    "BuildAids",
    "CallShapes",
    "Override",
    "Shape",
    "SketchKind",
    "Validator",
    "is_form_of",
    "is_sketched",
    "kind_named",
    "kind_of",
    "register_kind",
    "registered_kinds",
    "sketch_of",
    "supported_types",
    "swap_overrides",
    "swapped_whole",
    "unsupported_reason",
]

_BY_NAME: dict[str, SketchKind] = {}
_BY_DENSE: dict[type, SketchKind] = {}
_BY_SKETCH: dict[type, SketchKind] = {}

# kind name -> (module that must be imported first, "module:KindClass" that defines the kind)
_LAZY: dict[str, tuple[str, str]] = {
    "SKConv1D": ("transformers", "sketchtune.kinds.conv1d:Conv1DKind"),
    "Int8Conv1D": ("transformers", "sketchtune.kinds.conv1d:Int8Conv1DKind"),
}
_LAZY_FAILED: dict[str, str] = {}  # kind name -> why it could not be registered


def register_kind(kind: SketchKind) -> SketchKind:
    """Make ``kind`` available to selection, plans, the tuner, the FLOP model and export.

    Registering a kind of the same class under the same name again replaces
    the earlier one (a reloaded module); any other clash is an error.

    Args:
        kind: an instance of a :class:`~sketchtune.kinds.SketchKind` subclass.

    Returns:
        ``kind``.

    Raises:
        TypeError: ``kind`` is not a ``SketchKind`` or lacks ``name``/``dense_type``/``sketch_type``.
        ValueError: another kind already has its name, dense type or sketch type.
    """
    if not isinstance(kind, SketchKind):
        raise TypeError(
            f"`kind` must be an instance of a SketchKind subclass, got {kind!r} "
            f"({type(kind).__name__})."
        )
    for attr in ("name", "dense_type", "sketch_type", "params"):
        if not hasattr(kind, attr):
            raise TypeError(
                f"`kind` {type(kind).__name__} must set the class attribute `{attr}` "
                "(see sketchtune.kinds.SketchKind)."
            )
    if not isinstance(kind.name, str) or not kind.name:
        raise TypeError(f"`kind.name` must be a non-empty string, got {kind.name!r}.")
    for attr in ("dense_type", "sketch_type"):
        value = getattr(kind, attr)
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            raise TypeError(f"`kind.{attr}` must be an nn.Module subclass, got {value!r}.")
    previous = _BY_NAME.get(kind.name)
    if previous is not None and type(previous) is type(kind):
        _unregister(previous)
    clashes = [
        (_BY_NAME.get(kind.name), "name", kind.name),
        *(
            (_BY_SKETCH.get(sketch_type), "sketch type", sketch_type.__name__)
            for sketch_type in _sketch_types(kind)
        ),
    ]
    if kind.form_of is None:  # a form shares its primary kind's dense type
        clashes.append((_BY_DENSE.get(kind.dense_type), "dense type", kind.dense_type.__name__))
    for other, what, value in clashes:
        if other is not None:
            raise ValueError(
                f"cannot register {type(kind).__name__}: {other.name} ({type(other).__name__}) "
                f"already has the {what} {value!r}; give the new kind its own name, dense type "
                "and sketch type (a subclass of them is fine), or set form_of to register it "
                "as another form of the kind that sketches its dense type."
            )
    _BY_NAME[kind.name] = kind
    if kind.form_of is None:
        _BY_DENSE[kind.dense_type] = kind
    for sketch_type in _sketch_types(kind):
        _BY_SKETCH[sketch_type] = kind
    return kind


def _sketch_types(kind: SketchKind) -> tuple[type, ...]:
    return (kind.sketch_type, *kind.extra_sketch_types)


def _unregister(kind: SketchKind) -> None:
    _BY_NAME.pop(kind.name, None)
    if _BY_DENSE.get(kind.dense_type) is kind:
        _BY_DENSE.pop(kind.dense_type)
    for sketch_type in _sketch_types(kind):
        _BY_SKETCH.pop(sketch_type, None)


def _register_lazy(name: str, *, import_trigger: bool) -> None:
    trigger, target = _LAZY[name]
    if trigger not in sys.modules and not import_trigger:
        return
    del _LAZY[name]
    module_name, _, class_name = target.partition(":")
    try:
        kind_class = getattr(importlib.import_module(module_name), class_name)
        register_kind(kind_class())
    except ImportError as exc:
        _LAZY_FAILED[name] = (
            f"it needs {trigger}, which could not be imported ({exc}); "
            f"pip install 'sketchtune[{trigger}]'"
        )


def _ensure_lazy() -> None:
    for name in list(_LAZY):
        _register_lazy(name, import_trigger=False)


def _resolve(cls: type, table: Mapping[type, SketchKind]) -> SketchKind | None:
    for base in cls.__mro__:
        kind = table.get(base)
        if kind is not None:
            return kind
    return None


def registered_kinds() -> list[SketchKind]:
    """Every registered kind, in registration order."""
    _ensure_lazy()
    return list(_BY_NAME.values())


def kind_of(module: nn.Module) -> SketchKind | None:
    """The kind that sketches ``module``, or ``None`` when it is not sketchable."""
    _ensure_lazy()
    kind = _resolve(type(module), _BY_DENSE)
    if kind is None or _declined(kind, module) is not None:
        return None
    return kind


def _declined(kind: SketchKind, module: nn.Module) -> str | None:
    """Why ``kind`` does not sketch ``module`` after all: the kind's own reason, or a subclass's forward.

    A subclass of the kind's dense type with its own ``forward`` computes something
    else than the sketch would (a scaled or quantized Linear): sketching it would
    silently drop that behaviour, unless a kind is registered for that class.
    """
    reason = kind.unsupported(module)
    if reason is not None:
        return reason
    cls = type(module)
    for klass in cls.__mro__:
        if klass is kind.dense_type:
            return None
        if "forward" in vars(klass):
            return (
                f"{cls.__module__}.{cls.__qualname__} subclasses {kind.dense_type.__name__} with "
                f"its own forward (in {klass.__qualname__}), which a {kind.name} would not run; "
                "register a kind for that class (sketchtune.registry.register_kind) to sketch it"
            )
    return None


def kind_named(name: str) -> SketchKind:
    """The kind whose sketched type is called ``name`` (as stored in plans)."""
    _ensure_lazy()
    if name in _LAZY:
        _register_lazy(name, import_trigger=True)
    kind = _BY_NAME.get(name)
    if kind is not None:
        return kind
    why = f" ({_LAZY_FAILED[name]})" if name in _LAZY_FAILED else ""
    raise ValueError(f"unknown sketched layer type {name!r}{why}; known types: {list(_BY_NAME)}.")


def sketch_of(module: nn.Module) -> tuple[SketchKind, dict[str, Any]] | None:
    """``(kind, params)`` of a sketched layer, or ``None`` for any other module."""
    _ensure_lazy()
    kind = _resolve(type(module), _BY_SKETCH)
    return None if kind is None else (kind, kind.params_of(module))


def is_sketched(module: nn.Module) -> bool:
    """Whether ``module`` is one of the sketched layer types."""
    _ensure_lazy()
    return _resolve(type(module), _BY_SKETCH) is not None


def swapped_whole(module: nn.Module) -> bool:
    """Whether ``module`` is a sketchable dense layer or a sketched one.

    Such a module is selected, swapped and priced as a whole: none of its
    submodules (e.g. the ``out_proj`` of attention) is a candidate of its own.
    """
    _ensure_lazy()
    return (
        _resolve(type(module), _BY_DENSE) is not None
        or _resolve(type(module), _BY_SKETCH) is not None
    )


def supported_types() -> list[str]:
    """Names of the dense types that can be sketched."""
    return [kind.dense_type.__name__ for kind in registered_kinds() if kind.form_of is None]


def is_form_of(kind: SketchKind, primary: SketchKind) -> bool:
    """Whether plans may give a layer of ``primary``'s kind the form ``kind`` (itself included)."""
    return kind is primary or kind.form_of == primary.name


def unsupported_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be sketched (for error messages and selection reports)."""
    _ensure_lazy()
    kind = _resolve(type(module), _BY_DENSE)
    reason = _declined(kind, module) if kind is not None else None
    if reason is not None:
        return reason
    return f"sketchtune sketches only {', '.join(supported_types())}"


def swap_overrides(model: nn.Module, replacements: Mapping[str, nn.Module]) -> list[Override]:
    """The attributes of ``model`` to set while ``replacements`` are swapped in, one per target.

    Each kind answers for the layers it sketches (:meth:`SketchKind.overrides`);
    a replacement of no known kind gets the base class's answer.
    """
    modules = dict(model.named_modules())
    by_kind: dict[SketchKind | None, list[str]] = {}
    for name, new in replacements.items():
        sketched = sketch_of(new)
        kind = sketched[0] if sketched is not None else kind_of(modules.get(name, new))
        by_kind.setdefault(kind, []).append(name)
    seen: set[tuple[int, str]] = set()
    found: list[Override] = []
    for kind, names in by_kind.items():
        for override in (kind or SketchKind()).overrides(model, names):
            key = (id(override.target), override.attribute)
            if key not in seen:
                seen.add(key)
                found.append(override)
    return found


LINEAR = register_kind(LinearKind())
INT8_LINEAR = register_kind(Int8LinearKind())
CONV2D = register_kind(Conv2dKind())
MHA = register_kind(AttentionKind())
