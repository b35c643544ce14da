"""Argument checks shared by every layer of the package.

Each check raises before any work is done, with a message that names the
argument, shows the bad value and says what would be accepted. ``TypeError`` is
for a wrong type, ``ValueError`` for a wrong value; ``bool`` is never accepted
where a number is expected.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    hint: str = "",
) -> int:
    """Return ``value`` if it is an int within ``[minimum, maximum]``.

    Args:
        name: the argument's name, as the user spelled it.
        value: the value to check.
        minimum: smallest accepted value (inclusive), if any.
        maximum: largest accepted value (inclusive), if any.
        hint: text appended to the error, e.g. how the bound was derived.

    Raises:
        TypeError: ``value`` is not an int (``bool`` counts as not an int).
        ValueError: ``value`` is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        # numpy / torch integer scalars are fine; floats with integral values are not.
        if hasattr(value, "__index__") and not isinstance(value, bool):
            value = int(value.__index__())
        else:
            raise TypeError(f"`{name}` must be an int, got {value!r} ({_type_name(value)}).")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be {_range_text(minimum, maximum)}{hint}, got {value}.")
    return int(value)


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"between {minimum} and {maximum}"
    if minimum == 1:
        return "a positive int"
    if minimum == 0:
        return "a non-negative int"
    if minimum is not None:
        return f"at least {minimum}"
    return f"at most {maximum}"


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite float within the given bounds.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "__float__") and not hasattr(value, "__len__"):
            value = float(value)
        else:
            raise TypeError(f"`{name}` must be a number, got {value!r} ({_type_name(value)}).")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {number}.")
    low_bad = minimum is not None and (number < minimum if min_inclusive else number <= minimum)
    high_bad = maximum is not None and (number > maximum if max_inclusive else number >= maximum)
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{minimum} {'<=' if min_inclusive else '<'} "
        hi = "" if maximum is None else f" {'<=' if max_inclusive else '<'} {maximum}"
        raise ValueError(f"`{name}` must satisfy {lo}{name}{hi}, got {number}.")
    return number


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({_type_name(value)}).")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {listed}; got {value!r}.")
    return value


def check_seed(name: str, value: Any) -> int | None:
    """Return ``value`` if it is ``None`` or a non-negative int below 2**63."""
    if value is None:
        return None
    return check_int(name, value, minimum=0, maximum=2**63 - 1)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside the sketchtune package.

    A fixed ``stacklevel`` breaks whenever the call chain inside the package
    changes; this walks the stack instead, so the warning names the user's file.
    """
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level = 2  # stacklevel 2 is our caller, sys._getframe(1)
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
