"""What each selected layer can take: one search space fitted to layers of different sizes,
and layers whose weights are tied to another module's (which a sketch would untie)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from sketchtune._validation import warn
from sketchtune.config import LayerConfig
from sketchtune.registry import SketchKind
from sketchtune.space import Categorical, Int, ParamSpec

__all__ = ["fit_space", "without_tied"]


def fit_space(
    kind: SketchKind, dense: nn.Module, space: Mapping[str, ParamSpec], *, where: str
) -> dict[str, ParamSpec]:
    """``space`` restricted to the values ``dense`` can take (one search range, many layer sizes).

    A choice list keeps its valid members; an ``Int`` range is clipped to the
    layer's limit on the same step grid (validators reject values above a
    limit, so the valid values of a range are a prefix of it). Specs that need
    no change are returned as they are (the same objects).

    Raises:
        ValueError: an unknown or missing parameter, or no valid value left for a parameter.
    """
    fitted: dict[str, ParamSpec] = {}
    for param, spec in space.items():
        fitted[param] = _fit_spec(kind, dense, param, spec, where) if param in kind.params else spec
    kind.check_space(dense, fitted, where=where)  # names, and every value that remains
    return fitted


def _fit_spec(
    kind: SketchKind, dense: nn.Module, param: str, spec: ParamSpec, where: str
) -> ParamSpec:
    def reason(value: Any) -> str | None:
        return kind.validate(param, dense, value)

    if isinstance(spec, Categorical):
        valid = [c for c in spec.choices if reason(c) is None]
        if len(valid) == len(spec.choices):
            return spec
        invalid = [c for c in spec.choices if c not in valid]
        if not valid:
            raise _nothing_left(kind, dense, param, spec, reason(invalid[0]), where)
        numbers = [c for c in valid if _is_number(c)]
        if all(_is_number(c) for c in invalid) and numbers and min(invalid) > max(numbers):
            return Categorical(valid)  # values above this layer's limit ("full" may stay)
        # not a size limit (0 ranks, an unknown init): wrong for every layer
        raise ValueError(
            f"{where}: {param}={spec!r} allows {invalid[0]!r}, which is not valid for "
            f"{kind.describe(dense)}: {reason(invalid[0])}."
        )
    if isinstance(spec, Int):
        grid = spec.grid()
        if reason(grid[-1]) is None or reason(grid[0]) is not None:
            if reason(grid[0]) is not None:
                raise _nothing_left(kind, dense, param, spec, reason(grid[0]), where)
            return spec
        lo, hi = 0, len(grid) - 1  # grid[lo] is valid, grid[hi] is not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if reason(grid[mid]) is None else (lo, mid)
        return Int(spec.low, grid[lo], step=spec.step, log=spec.log)
    return spec  # Float and custom specs: checked exactly by check_space


def without_tied(model: nn.Module, names: list[str], config: LayerConfig, where: str) -> list[str]:
    """``names`` less the layers whose weights are tied to another module's (a sketch would untie them).

    Naming such a layer explicitly is an error; a pattern that matches one skips
    it with a warning.
    """
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(module_name)
    tied: dict[str, str] = {}
    for name in names:
        for param in model.get_submodule(name)._parameters.values():
            others = (
                [o for o in owners.get(id(param), []) if o != name] if param is not None else []
            )
            if others:
                tied[name] = others[0]
                break
    if not tied:
        return names
    listed = ", ".join(f"{n!r} (tied to {o!r})" for n, o in tied.items())
    if isinstance(config.layer_names, (list, tuple)):
        raise ValueError(
            f"`{where}` names {listed}: these layers share their weights with another module, "
            "and a sketch would silently untie them. Leave them out of the selection, or untie "
            "the weights first (e.g. clone the shared parameter)."
        )
    warn(
        f"`{where}` matches {listed}, whose weights are tied to another module; they stay dense "
        "(a sketch would silently untie them)."
    )
    remaining = [n for n in names if n not in tied]
    if not remaining:
        raise ValueError(f"`{where}` matches only layers with tied weights ({listed}).")
    return remaining


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _nothing_left(
    kind: SketchKind, dense: nn.Module, param: str, spec: ParamSpec, why: str | None, where: str
) -> ValueError:
    return ValueError(
        f"{where}: {param}={spec!r} leaves no value that {kind.describe(dense)} can take "
        f"({why}). Include values within that limit in the space, or select this layer in a "
        "config of its own."
    )
