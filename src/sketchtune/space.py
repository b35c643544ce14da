"""Search-space specifications: ``Categorical``, ``Int`` and ``Float``.

A plain list (or tuple) in a ``params`` dict means ``Categorical``; a single
value means that value, fixed. Specs validate themselves on construction, have
a readable ``repr`` (``Int(8, 64, step=8)``), round-trip through plain dicts
(for YAML configs and JSON results), and know how to ask an Optuna trial for a
value.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sketchtune._validation import check_bool, check_float, check_int

if TYPE_CHECKING:
    import optuna

__all__ = ["Categorical", "Float", "Int", "ParamSpec", "as_spec"]

_CHOICE_TYPES = (type(None), bool, int, float, str)


class ParamSpec(ABC):
    """Base class of the search-space specifications."""

    @abstractmethod
    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> Any:
        """Ask ``trial`` for a value of the parameter called ``name``."""

    @abstractmethod
    def first(self) -> Any:
        """The first value of the space (used by ``replace_without_tuning``)."""

    @abstractmethod
    def grid(self) -> list[Any]:
        """Every value of a finite space, in order; ``ValueError`` for continuous ones."""

    @abstractmethod
    def contains(self, value: Any) -> bool:
        """Whether ``value`` belongs to the space."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A plain-dict form (``{"type": "Int", ...}``) that :func:`as_spec` reads back."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))


class Categorical(ParamSpec):
    """A fixed set of choices (``None``, bool, int, float or str, as Optuna stores them).

    Args:
        choices: the values to choose from, in order; at least one, no duplicates.

    Example:
        >>> Categorical([1, 2, 3])
        Categorical([1, 2, 3])
    """

    def __init__(self, choices: Sequence[Any]) -> None:
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
            raise TypeError(
                f"`choices` must be a list of values, got {choices!r} ({type(choices).__name__})."
            )
        values = list(choices)
        if not values:
            raise ValueError("`choices` must hold at least one value, got [].")
        for value in values:
            if not isinstance(value, _CHOICE_TYPES):
                raise TypeError(
                    f"`choices` may hold only None, bool, int, float or str (what Optuna can "
                    f"store), got {value!r} ({type(value).__name__})."
                )
        for i, value in enumerate(values):
            if any(_same(value, other) for other in values[:i]):
                raise ValueError(
                    f"`choices` must not repeat a value, got {values!r} ({value!r} twice)."
                )
        self.choices: list[Any] = values

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)

    def first(self) -> Any:
        return self.choices[0]

    def grid(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        return any(_same(value, choice) for choice in self.choices)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Categorical", "choices": list(self.choices)}

    def __repr__(self) -> str:
        return f"Categorical({self.choices!r})"

    def __iter__(self) -> Iterator[Any]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)


class Int(ParamSpec):
    """An integer range ``low..high`` (inclusive), with an optional step or log scale.

    Args:
        low: smallest value.
        high: largest value; ``high - low`` must be a multiple of ``step``.
        step: spacing of the values.
        log: sample on a log scale (needs ``low >= 1`` and ``step == 1``).

    Example:
        >>> Int(8, 64, step=8)
        Int(8, 64, step=8)
    """

    def __init__(self, low: int, high: int, step: int = 1, log: bool = False) -> None:
        self.low = check_int("low", low)
        self.high = check_int("high", high)
        self.step = check_int("step", step, minimum=1)
        self.log = check_bool("log", log)
        if self.low > self.high:
            raise ValueError(f"`low` must be <= `high`, got Int(low={self.low}, high={self.high}).")
        if self.log and self.low < 1:
            raise ValueError(
                f"`low` must be >= 1 when log=True (a log scale needs positive values), got {self.low}."
            )
        if self.log and self.step != 1:
            raise ValueError(f"`step` must be 1 when log=True, got step={self.step}.")
        if (self.high - self.low) % self.step:
            below = self.low + (self.high - self.low) // self.step * self.step
            raise ValueError(
                f"`high` - `low` must be a multiple of `step`, got Int({self.low}, {self.high}, "
                f"step={self.step}); use high={below} or high={below + self.step}."
            )

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def first(self) -> int:
        return self.low

    def grid(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
            and (value - self.low) % self.step == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "Int",
            "low": self.low,
            "high": self.high,
            "step": self.step,
            "log": self.log,
        }

    def __repr__(self) -> str:
        extra = (f", step={self.step}" if self.step != 1 else "") + (
            ", log=True" if self.log else ""
        )
        return f"Int({self.low}, {self.high}{extra})"


class Float(ParamSpec):
    """A real range ``[low, high]``, with an optional step (discrete) or log scale.

    Args:
        low: smallest value.
        high: largest value.
        step: spacing of the values (``None``: continuous).
        log: sample on a log scale (needs ``low > 0`` and no step).

    Example:
        >>> Float(1e-5, 1e-2, log=True)
        Float(1e-05, 0.01, log=True)
    """

    def __init__(
        self, low: float, high: float, step: float | None = None, log: bool = False
    ) -> None:
        self.low = check_float("low", low)
        self.high = check_float("high", high)
        self.step = (
            None if step is None else check_float("step", step, minimum=0.0, min_inclusive=False)
        )
        self.log = check_bool("log", log)
        if self.low > self.high:
            raise ValueError(
                f"`low` must be <= `high`, got Float(low={self.low}, high={self.high})."
            )
        if self.log and self.low <= 0:
            raise ValueError(
                f"`low` must be > 0 when log=True (a log scale needs positive values), got {self.low}."
            )
        if self.log and self.step is not None:
            raise ValueError(f"`step` must be None when log=True, got step={self.step}.")

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def first(self) -> float:
        return self.low

    def grid(self) -> list[float]:
        if self.step is None:
            raise ValueError(
                f"{self!r} is continuous and has no grid; give it a `step` to search it exhaustively."
            )
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low - 1e-12 <= value <= self.high + 1e-12:
            return False
        if self.step is None:
            return True
        units = (value - self.low) / self.step
        return abs(units - round(units)) < 1e-6

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "Float",
            "low": self.low,
            "high": self.high,
            "step": self.step,
            "log": self.log,
        }

    def __repr__(self) -> str:
        extra = (f", step={self.step}" if self.step is not None else "") + (
            ", log=True" if self.log else ""
        )
        return f"Float({self.low}, {self.high}{extra})"


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps ``True`` and ``1`` apart, as Optuna does."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


_SPEC_TYPES: dict[str, type[ParamSpec]] = {"Categorical": Categorical, "Int": Int, "Float": Float}


def as_spec(value: Any, *, name: str = "params") -> ParamSpec:
    """Read a spec from a ``ParamSpec``, a list (Categorical), a spec dict, or a single fixed value.

    Spec dicts are what :meth:`ParamSpec.to_dict` writes and what YAML configs
    hold: ``{"type": "Int", "low": 8, "high": 64, "step": 8}``,
    ``{"type": "Categorical", "choices": [1, 2]}``. ``Int``/``Float`` dicts may
    also be written with ``class_path``/``init_args`` as LightningCLI does.

    Args:
        value: the value to read.
        name: where the value came from, for error messages.
    """
    if isinstance(value, ParamSpec):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return Categorical(list(value))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
    if isinstance(value, dict):
        return _spec_from_dict(value, name)
    if isinstance(value, _CHOICE_TYPES):
        return Categorical([value])
    raise TypeError(
        f"{name} must be a Categorical/Int/Float, a list of choices or a single value, "
        f"got {value!r} ({type(value).__name__})."
    )


def _spec_from_dict(data: dict[str, Any], name: str) -> ParamSpec:
    if "class_path" in data:
        kind = str(data["class_path"]).rsplit(".", 1)[-1]
        kwargs = dict(data.get("init_args") or {})
    else:
        kwargs = dict(data)
        kind = kwargs.pop("type", None)
    spec_type = _SPEC_TYPES.get(str(kind))
    if spec_type is None:
        raise ValueError(
            f"{name} has an unknown spec type {kind!r}; use one of "
            f"{sorted(_SPEC_TYPES)} (e.g. {{'type': 'Int', 'low': 8, 'high': 64}})."
        )
    try:
        return spec_type(**kwargs)
    except TypeError as exc:
        if "unexpected keyword" in str(exc) or "missing" in str(exc):
            raise TypeError(f"{name}: bad fields for {kind}: {exc}") from None
        raise TypeError(f"{name}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
