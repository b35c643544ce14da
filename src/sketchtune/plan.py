"""SketchPlan: which layer becomes which sketched layer, with which parameters and seed.

A plan is plain data, saved as JSON (never pickle, so loading one never runs
code)::

    {"_type": "sketchtune.SketchPlan", "_version": 1,
     "layers": {"fc1": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 32},
                        "seed": 1234, "copy_weights": true, "dense": "Linear(784->1024)"}}}

``apply_plan(fresh_model, plan)`` rebuilds the sketched architecture; loading the
tuned model's ``state_dict`` afterwards reproduces its outputs bit for bit (the
random matrices are buffers, and the seed rebuilds them identically anyway).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from sketchtune._atomic import write_text_atomic
from sketchtune.registry import (
    BuildAids,
    is_form_of,
    is_sketched,
    kind_named,
    kind_of,
    swap_overrides,
    unsupported_reason,
)
from sketchtune.select import sketchable_layers

__all__ = ["LayerPlan", "SketchPlan", "Swap", "apply_plan"]

PLAN_TYPE = "sketchtune.SketchPlan"
PLAN_VERSION = 1
_LAYER_KEYS = frozenset({"type", "params", "seed", "copy_weights", "dense"})


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is sketched.

    Attributes:
        type: the sketched type's name (``"SKLinear"``, ``"SKConv2d"``, ``"RandMultiHeadAttention"``).
        params: its parameters (``{"num_terms": 1, "low_rank": 32}``).
        seed: seed of its random matrices.
        copy_weights: whether the sketch starts from the dense layer's weights.
        dense: description of the dense layer it was made for (checked on apply).
    """

    type: str
    params: dict[str, Any]
    seed: int
    copy_weights: bool = True
    dense: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "params": dict(self.params),
            "seed": self.seed,
            "copy_weights": self.copy_weights,
        }
        if self.dense is not None:
            out["dense"] = self.dense
        return out

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> LayerPlan:
        """Read one layer's entry strictly: known keys only, exact types, no coercion."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object with type/params/seed, got {data!r}.")
        missing = [k for k in ("type", "params", "seed") if k not in data]
        if missing:
            raise ValueError(f"{where} lacks {missing}; got keys {sorted(data)}.")
        unknown = sorted(set(data) - _LAYER_KEYS)
        if unknown:
            raise ValueError(
                f"{where} has unknown key(s) {unknown}; a layer entry holds only "
                f"{sorted(_LAYER_KEYS)}."
            )
        if not isinstance(data["type"], str):
            raise ValueError(f"{where}.type must be a string, got {data['type']!r}.")
        kind_named(data["type"])  # unknown types are an error here, not at apply time
        if not isinstance(data["params"], dict) or not all(
            isinstance(k, str) for k in data["params"]
        ):
            raise ValueError(f"{where}.params must be an object, got {data['params']!r}.")
        seed = data["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"{where}.seed must be a non-negative int, got {seed!r}.")
        copy_weights = data.get("copy_weights", True)
        if not isinstance(copy_weights, bool):
            raise ValueError(f"{where}.copy_weights must be true or false, got {copy_weights!r}.")
        dense = data.get("dense")
        if dense is not None and not isinstance(dense, str):
            raise ValueError(f"{where}.dense must be a string, got {dense!r}.")
        return cls(
            type=data["type"],
            params=dict(data["params"]),
            seed=seed,
            copy_weights=copy_weights,
            dense=dense,
        )


class SketchPlan(Mapping[str, LayerPlan]):
    """An immutable mapping ``qualified layer name -> LayerPlan``, saved as JSON.

    Example:
        >>> import torch
        >>> from sketchtune import SketchPlan, apply_plan
        >>> plan = SketchPlan({"0": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 8}, "seed": 0}})
        >>> model = apply_plan(torch.nn.Sequential(torch.nn.Linear(64, 64)), plan)
        >>> type(model[0]).__name__
        'SKLinear'
        >>> SketchPlan.from_json(plan.to_json()) == plan
        True
    """

    def __init__(self, layers: Mapping[str, LayerPlan | dict[str, Any]] | None = None) -> None:
        converted: dict[str, LayerPlan] = {}
        for name, entry in (layers or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"plan layer names must be strings, got {name!r}.")
            converted[name] = (
                entry
                if isinstance(entry, LayerPlan)
                else LayerPlan.from_dict(entry, where=f"plan[{name!r}]")
            )
        self._layers = converted

    def __getitem__(self, name: str) -> LayerPlan:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SketchPlan) and self._layers == other._layers

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {p.type}({_fmt(p.params)})" for n, p in self._layers.items())
        return f"SketchPlan({{{inner}}})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": PLAN_TYPE,
            "_version": PLAN_VERSION,
            "layers": {name: plan.to_dict() for name, plan in self._layers.items()},
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> SketchPlan:
        """Read a plan written by :meth:`to_dict`; anything else is a clear ``ValueError``."""
        if not isinstance(data, dict) or data.get("_type") != PLAN_TYPE:
            got = data.get("_type") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a sketchtune plan: expected _type={PLAN_TYPE!r}, got {got!r}.")
        version = data.get("_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(
                f"plan has no valid _version, got {version!r}; this sketchtune reads version "
                f"{PLAN_VERSION}."
            )
        if version > PLAN_VERSION:
            raise ValueError(
                f"plan format version {version} was written by a newer sketchtune; this one reads "
                f"version {PLAN_VERSION}. Upgrade sketchtune to load it."
            )
        unknown = sorted(set(data) - {"_type", "_version", "layers"})
        if unknown:
            raise ValueError(
                f"plan has unknown key(s) {unknown}; a plan holds only _type, _version and layers."
            )
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise ValueError(f"plan.layers must be an object, got {layers!r}.")
        return cls(layers)

    @classmethod
    def from_json(cls, text: str) -> SketchPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan is not valid JSON: {exc}.") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON to ``path``, atomically (a failed write keeps the old file)."""
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SketchPlan:
        """Read a plan saved by :meth:`save`."""
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None


def _fmt(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


class Swap:
    """Puts replacement modules into a model and takes them out again, exactly.

    Used as a context manager, the originals are back when the block exits,
    even on exceptions (``KeyboardInterrupt`` included). ``apply`` and
    ``restore`` may alternate, e.g. to time dense and sketched models interleaved.
    """

    def __init__(self, model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
        self._entries: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
        slots = _slots(model)
        for name, new in replacements.items():
            parent_name, _, attr = name.rpartition(".")
            original = getattr(model.get_submodule(parent_name), attr)
            # every attribute path that holds the module (``m.b = m.a``) gets the sketch
            for parent, slot in slots.get(id(original), [(model.get_submodule(parent_name), attr)]):
                self._entries.append((parent, slot, original, new))
        # model-level switches the kinds ask for while their sketches are in (e.g. the
        # nested-tensor fast path of nn.TransformerEncoder, which reads dense weights)
        self._overrides = swap_overrides(model, replacements)
        self._saved: list[Any] = []
        self.applied = False

    def apply(self) -> None:
        for parent, attr, _, new in self._entries:
            setattr(parent, attr, new)
        if not self.applied:
            self._saved = [getattr(o.target, o.attribute) for o in self._overrides]
            for override in self._overrides:
                setattr(override.target, override.attribute, override.value)
        self.applied = True

    def restore(self) -> None:
        for parent, attr, original, _ in reversed(self._entries):
            setattr(parent, attr, original)
        if self.applied:
            for override, saved in zip(self._overrides, self._saved, strict=True):
                setattr(override.target, override.attribute, saved)
        self.applied = False

    def __enter__(self) -> Swap:
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(module) -> [(parent, attribute), ...]`` for every place a submodule is held."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, attr))
    return slots


def build_replacements(
    model: nn.Module,
    plan: SketchPlan,
    *,
    build: Callable[[SketchPlan], dict[str, nn.Module]] | None = None,
    bounded: bool = True,
) -> dict[str, nn.Module]:
    """Check ``plan`` against ``model`` and build every sketched layer, changing nothing in ``model``.

    ``build`` replaces the default construction (the tuner passes its own, which
    reuses input statistics and factorizations); the checks are the same.
    ``bounded`` refuses sketches that would store more values than the layer they
    replace (plans from files and checkpoints; the tuner's own plans may explore them).

    Raises:
        ValueError: a layer is missing, has another type or size than the plan was
            made for, is already sketched, or has invalid parameters.
    """
    modules = dict(model.named_modules())
    missing = [name for name in plan if name not in modules or not name]
    if missing:
        listing = ", ".join(repr(n) for n, _, _ in sketchable_layers(model)[:8])
        raise ValueError(
            f"the plan names layer(s) the model lacks: {missing}. Apply the plan to the same "
            f"architecture it was made for (sketchable layers here: {listing or 'none'})."
        )
    built: dict[str, nn.Module] = {}
    for name, layer in plan.items():
        module = modules[name]
        expected = kind_named(layer.type)
        if is_sketched(module):
            raise ValueError(
                f"layer {name!r} is already a {type(module).__name__}; apply the plan to a dense model."
            )
        kind = kind_of(module)
        if kind is None or not is_form_of(expected, kind):
            reason = (
                unsupported_reason(module) if kind is None else f"it is sketched as {kind.name}"
            )
            raise ValueError(
                f"the plan makes {name!r} a {layer.type}, but the model's {name!r} is a "
                f"{type(module).__name__} ({reason})."
            )
        if layer.dense is not None and layer.dense != kind.describe(module):
            raise ValueError(
                f"the plan was made for {layer.dense} at {name!r}, but the model has "
                f"{kind.describe(module)} there; use the plan with the model it was tuned on."
            )
        kind = expected  # the form the plan names (a kind of its own, or the layer's kind)
        kind.check_params(module, layer.params, where=f"plan[{name!r}]")
        if bounded:  # a plan from a file or checkpoint: never bigger than the layer
            kind.check_size(module, layer.params, where=f"plan[{name!r}]")
        if build is None:
            built[name] = kind.build(
                module, dict(layer.params), layer.seed, layer.copy_weights, BuildAids(quiet=True)
            )
    if build is not None:
        return build(plan)
    return built


def apply_plan(
    model: nn.Module,
    plan: SketchPlan | Mapping[str, Any] | str | os.PathLike[str],
    *,
    bounded: bool = True,
) -> nn.Module:
    """Replace the layers named in ``plan`` with their sketched versions, in place.

    Everything is checked and built before the first layer is replaced, so a bad
    plan leaves the model untouched. Layers tuned with ``init="activation"``
    are built with ``init="svd"`` here (a plan carries no input statistics):
    the tuned ``state_dict`` loaded afterwards overwrites their weights, so the
    init does not matter then, and nothing is printed.

    Args:
        model: a dense model of the architecture the plan was made for.
        plan: a :class:`SketchPlan`, its ``to_dict()`` form, or a path to its JSON file.
        bounded: refuse sketches that would store more values than the layer they
            replace (a plan from a file must not make us allocate more than the model).

    Returns:
        ``model`` itself, with the sketched layers in place.
    """
    Swap(model, build_replacements(model, as_plan(plan), bounded=bounded)).apply()
    return model


def as_plan(plan: SketchPlan | Mapping[str, Any] | str | os.PathLike[str]) -> SketchPlan:
    """A :class:`SketchPlan` from a plan, its ``to_dict()`` form, a ``{name: layer}`` mapping or a JSON path."""
    if isinstance(plan, SketchPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return SketchPlan.load(plan)
    if not isinstance(plan, Mapping):
        raise TypeError(
            "`plan` must be a SketchPlan, its to_dict() form or a path to its JSON file, "
            f"got {type(plan).__name__}."
        )
    return SketchPlan.from_dict(plan) if "_type" in plan else SketchPlan(plan)
