"""Argument checks shared by the engines, callbacks and experiments.

Each check refuses a bad value with one clear line that names the argument, the value and
what to pass instead, before any work starts. ``bool`` is refused where an ``int`` is
expected (``True`` is an ``int`` to Python, never a count to a user).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _alternatives(special: Mapping[Any, str]) -> str:
    return "".join(f", or {value!r} ({meaning})" for value, meaning in special.items())


def check_positive_int(name: str, value: Any, special: Mapping[Any, str] | None = None) -> None:
    """Refuse ``value`` unless it is an int >= 1 or one of the ``special`` values.

    Args:
        name: The argument's name, as the user writes it.
        value: The value given.
        special: Values with a meaning of their own, e.g. ``{-1: "no limit"}`` or
            ``{None: "never"}``; listed in the message.

    Raises:
        TypeError: If ``value`` is not an int (a bool counts as not an int).
        ValueError: If it is an int below 1 and not a special value.
    """
    special = special or {}
    if any(value is key or (type(value) is type(key) and value == key) for key in special):
        return
    hint = f"use an int >= 1{_alternatives(special)}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; {hint}.")
    if value < 1:
        raise ValueError(f"{name}={value!r} is invalid; {hint}.")


def check_finite_float(
    name: str, value: Any, minimum: float | None = None, maximum: float | None = None
) -> None:
    """Refuse ``value`` unless it is a finite real number within ``[minimum, maximum]``.

    Raises:
        TypeError: If ``value`` is not an int or float (bools refused).
        ValueError: If it is NaN, infinite or out of the range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; use a number.")
    low = "-inf" if minimum is None else repr(minimum)
    high = "inf" if maximum is None else repr(maximum)
    if (
        not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"{name}={value!r} is invalid; use a finite number in [{low}, {high}].")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Refuse ``value`` unless it is one of ``choices``.

    Raises:
        ValueError: Listing the choices.
    """
    if value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{name}={value!r} is invalid; use one of {listed}.")


def check_list_of(name: str, value: Any, kind: type[T]) -> list[T]:
    """``value`` (one ``kind`` object, a list or tuple of them, or None) as a list.

    Raises:
        TypeError: Naming the first item that is not a ``kind``.
    """
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for idx, item in enumerate(items):
        if not isinstance(item, kind):
            where = (
                name
                if len(items) == 1 and not isinstance(value, (list, tuple))
                else (f"{name}[{idx}]")
            )
            raise TypeError(
                f"{where} is a {type(item).__name__}; {name} must be {kind.__name__} objects."
            )
    return items
