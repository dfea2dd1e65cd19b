"""`Table`: reads one table of a config file, knowing its key path and its allowed keys.

Nothing stops at the first problem: a wrong type or an out-of-range value is
recorded (`checks.Problems`) at its exact key path and the default takes its
place, so the walk goes on.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from balancer.config.bounds import as_number, show_value
from balancer.config.checks import Problems
from balancer.config.keylines import join_key
from balancer.config.model import BOUNDS


class Table:
    """Reads one table of the config, knowing its dotted path and allowed keys."""

    def __init__(self, data: dict[str, object], path: str, problems: Problems) -> None:
        self.data = data
        self.path = path
        self.problems = problems

    @classmethod
    def read(
        cls, data: object, path: str, problems: Problems, allowed: Iterable[str], *, what: str
    ) -> Table | None:
        """A reader for `data`, or None (the problem recorded) when it is not a table."""
        if not isinstance(data, dict):
            problems.add(path, f"expected {what}, got {show_value(data)}")
            return None
        table = cls(data, path, problems)
        known = tuple(allowed)
        for key in data:
            if key not in known:
                problems.add(table.where(key), unknown_key(key, known))
        return table

    def where(self, key: str) -> str:
        return join_key(self.path, key)

    def fail(self, key: str, message: str) -> None:
        self.problems.add(self.where(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def clean(self, *keys: str) -> bool:
        return self.problems.clean(*(self.where(key) for key in keys))

    def bounded(self, key: str, default: float, bound: str | None = None) -> float:
        """A number within `BOUNDS[bound or key]`."""
        limits = BOUNDS[bound or key]
        if key not in self.data:
            return default
        value = self.data[key]
        number = as_number(value)
        if number is not None and limits.admits(number):
            return number
        self.fail(key, f"expected {limits.expected(False)}, got {show_value(value)}")
        return default

    def bounded_int(self, key: str, default: int, bound: str | None = None) -> int:
        """An integer within `BOUNDS[bound or key]`."""
        limits = BOUNDS[bound or key]
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, int) and not isinstance(value, bool) and limits.admits(value):
            return value
        self.fail(key, f"expected {limits.expected(True)}, got {show_value(value)}")
        return default

    def boolean(self, key: str, default: bool) -> bool:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool):
            return value
        self.fail(key, f"expected true or false, got {show_value(value)}")
        return default

    def string(self, key: str) -> str | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, str) and value:
            return value
        self.fail(key, f"expected a non-empty string, got {show_value(value)}")
        return None

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        if key not in self.data:
            return default
        value = self.data[key]
        options = sorted(choices)
        if isinstance(value, str) and value in options:
            return value
        listed = ", ".join(repr(c) for c in options)
        message = f"expected one of {listed}, got {show_value(value)}"
        if isinstance(value, str):
            message += did_you_mean(value, options)
        self.fail(key, message)
        return default


def did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    hint = did_you_mean(key, allowed)
    if hint:
        return f"unknown key {key!r}{hint}"
    return f"unknown key {key!r}; expected one of: {', '.join(allowed) or 'none'}"
