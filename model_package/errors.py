"""The error users get for bad input: which series, which field, which rule."""

from __future__ import annotations


class KronosInputError(ValueError):
    """Invalid forecast input. `field` is a column or parameter name; `series` is the
    series id it concerns (None when it concerns the whole request)."""

    def __init__(self, field: str, rule: str, series: object | None = None) -> None:
        self.field, self.rule, self.series = field, rule, series
        where = f"series {series!r}, " if series is not None else ""
        super().__init__(f"{where}{field}: {rule}")
