"""The error users get for bad input: which series, which field, which rule."""

from __future__ import annotations

import math

import numpy as np

# Longest repr of a client's value quoted in a message (a 1 MB string is not echoed back).
BRIEF_CHARS = 60


class KronosInputError(ValueError):
    """Invalid forecast input. `field` is a column or parameter name; `series` is the
    series id it concerns (None when it concerns the whole request)."""

    def __init__(self, field: str, rule: str, series: object | None = None) -> None:
        self.field, self.rule, self.series = field, rule, series
        where = f"series {brief(series)}, " if series is not None else ""
        super().__init__(f"{where}{field}: {rule}")


def brief(value: object, limit: int = BRIEF_CHARS) -> str:
    """repr(value), cut to `limit` characters (with "..." when cut)."""
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__ must not turn a 400 into a 500
        text = f"<{type(value).__name__}>"
    return cut(text, limit)


def cut(text: str, limit: int = BRIEF_CHARS) -> str:
    """`text` cut to `limit` characters (with "..." when cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checked_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """An int (not bool) in [minimum, maximum] (no upper bound when maximum is None)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise KronosInputError(name, f"must be an integer, got {brief(value)}")
    number = int(value)
    if number < minimum:
        raise KronosInputError(name, f"must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise KronosInputError(name, f"must be <= {maximum}, got {brief(number)}")
    return number


def checked_real(name: str, value: object) -> float:
    """A finite float from an int or float (not bool, NaN or infinite)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise KronosInputError(name, f"must be a number, got {brief(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise KronosInputError(name, f"must be a finite number, got {brief(value)}")
    return number
