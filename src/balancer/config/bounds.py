"""The range a number a user can set must lie in (config keys and policy options alike)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard


@dataclass(frozen=True)
class Bound:
    """The range a number a user can set must lie in.

    With `off`, 0 is also accepted and means "off" or "unlimited" (below `low`).
    """

    low: float
    high: float
    off: bool = False
    unit: str = ""

    def admits(self, value: float) -> bool:
        return (self.off and value == 0) or self.low <= value <= self.high

    def expected(self, integer: bool) -> str:
        what = "an integer" if integer else "a number"
        unit = f" {self.unit}" if self.unit else ""
        text = f"{what} from {fmt_number(self.low)} to {fmt_number(self.high)}{unit}"
        return f"0 (off) or {text}" if self.off else text


def fmt_number(value: float) -> str:
    """`value` as a user wrote it: `5` rather than `5.0`, `1e-06` for tiny ones."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def as_number(value: object) -> float | None:
    """`value` as a float if it is a finite int or float (not a bool), else None.

    An int too large for a float (JSON and TOML allow any number of digits) is None too.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def show_value(value: object) -> str:
    """`value` for an error message: short, and safe for an int of any size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        # repr() of a long int is slow, and refused over 4300 digits: count them instead
        digits = int((abs(value).bit_length() - 1) * math.log10(2)) + 1
        digits += abs(value) >= 10**digits
        return f"an integer of {digits} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return "a value too large to show"
    return text if len(text) <= 80 else text[:77] + "..."


def is_integer(value: object) -> TypeGuard[int]:
    """An int, not a bool (True is an int to Python, not to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)
